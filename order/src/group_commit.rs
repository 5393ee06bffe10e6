//! Group commit at intake: concurrent `CreateOrder` calls share one
//! transaction.
//!
//! PostgreSQL's CPU is the pipeline's bottleneck, and what it spends at
//! intake goes per statement, not per row: written alone, an order costs a
//! transaction of five round trips. Here the calls hand their validated,
//! priced order (and the trace context of their request) to a small pool of
//! writers; a writer that is free takes every request queued at that moment
//! (up to `INTAKE_GROUP_MAX`) and writes them as one group: one lookup of
//! the group's idempotency keys, then one statement that writes the orders,
//! their items and their events (one round trip, one transaction; see
//! [`store::insert_orders`]), then it answers each caller with its own
//! outcome.
//!
//! - **No artificial wait.** A request that finds a writer idle and nobody
//!   queued is handed to it at once, as a group of one; groups grow only
//!   while every writer is busy, which is exactly when sharing pays.
//!   Several writers (`INTAKE_WRITERS`, default 1) let one group's commit
//!   (its fsync) overlap the next group's statements, at the price of
//!   smaller groups.
//! - **Durable before acknowledged.** A caller is answered after its
//!   group's `COMMIT` returned (`synchronous_commit` stays on).
//! - **Per-request outcomes.** Validation and pricing happen before the
//!   queue, in the caller. Idempotency keys are resolved per request
//!   ([`crate::idempotency`]). A group whose transaction fails for another
//!   reason than an unreachable database is replayed one request per
//!   transaction, so that only the request at fault fails.
//! - **Bounded queue, shedding.** At most `INTAKE_QUEUE_MAX` requests wait
//!   for a writer (more are shed at once), and each waits at most
//!   `INTAKE_QUEUE_TIMEOUT_MS` for one: then it leaves the queue and is shed
//!   with `UNAVAILABLE` "overloaded", as it was shed when no pool connection
//!   came in time before groups existed. A request a writer has taken is
//!   never shed: its outcome is decided by its transaction.
//! - **Unreachable database.** A group is retried with backoff for at most
//!   the queue timeout, then its callers get `UNAVAILABLE`. Retrying is safe
//!   even when a lost connection hid a successful commit: order ids are
//!   chosen before the first attempt, a retry skips ids already stored
//!   (`ON CONFLICT DO NOTHING`) and answers with them.
//! - **Shutdown.** Writers are the service's last tasks: they stop only
//!   after the servers have finished every in-flight call, and take what
//!   is still queued before they stop; a call that comes after that gets
//!   `UNAVAILABLE`. Nothing accepted is lost.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use common::{
    config::{self, ConfigError},
    db,
    outbox::Notifier,
    retry::Backoff,
    supervisor::TaskResult,
};
use shop_proto::order::Order;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    error::OrderError,
    idempotency::{self, Step},
    store::{self, Pending},
};

/// How group commit runs (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `INTAKE_WRITERS` (default 1, at least 1): groups written at once.
    /// One writer makes the largest groups, hence the fewest statements:
    /// PostgreSQL's CPU per order fell 12-16 % against two (BENCHMARKS.md).
    /// More pay where a commit's WAL flush is slow (network disks): one
    /// group's flush then overlaps the next group's statements.
    pub writers: usize,
    /// `INTAKE_GROUP_MAX` (default 256, at least 1): most requests in one
    /// group (one transaction).
    pub group_max: usize,
    /// `INTAKE_QUEUE_MAX` (default 1024): most requests waiting for a
    /// writer; a request that finds the queue full is shed at once.
    pub queue_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            writers: 1,
            group_max: 256,
            queue_max: 1024,
        }
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            writers: config::var("INTAKE_WRITERS", d.writers)?.max(1),
            group_max: config::var("INTAKE_GROUP_MAX", d.group_max)?.max(1),
            queue_max: config::var("INTAKE_QUEUE_MAX", d.queue_max)?,
        })
    }
}

/// What a caller is answered.
type Outcome = Result<Order, OrderError>;

/// A request waiting for a writer, or in a writer's group.
struct Queued {
    ticket: u64,
    /// When it was handed over or queued.
    since: Instant,
    order: Pending,
    reply: oneshot::Sender<Outcome>,
}

/// A writer's mailbox, through which a caller hands it a group of one.
type Mailbox = mpsc::Sender<Vec<Queued>>;

struct State {
    queue: VecDeque<Queued>,
    /// Writers waiting for work.
    idle: Vec<Mailbox>,
    /// Shutdown: no request is taken any more.
    closed: bool,
    next_ticket: u64,
}

struct Shared {
    state: Mutex<State>,
    settings: Settings,
    queue_timeout: Duration,
    pool: PgPool,
    order_deadline: Duration,
    outbox: Notifier,
}

/// The callers' handle to the writers; cheap to clone. Start the writers
/// with [`GroupCommit::run`], one task each.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Writers on `pool`; a request waits at most `queue_timeout` for one.
    /// `order_deadline` is each new order's `ORDER_DEADLINE_SECS`; `outbox`
    /// wakes the relay after each commit.
    #[must_use]
    pub fn new(
        pool: PgPool,
        settings: Settings,
        queue_timeout: Duration,
        order_deadline: Duration,
        outbox: Notifier,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: Vec::new(),
                    closed: false,
                    next_ticket: 0,
                }),
                settings,
                queue_timeout,
                pool,
                order_deadline,
                outbox,
            }),
        }
    }

    /// How many writer tasks to run.
    #[must_use]
    pub fn writers(&self) -> usize {
        self.shared.settings.writers
    }

    /// Writes `order` in the next group a writer takes and returns its
    /// outcome once that group committed; or sheds it (`Overloaded`) when
    /// the queue is full or no writer took it within the queue timeout.
    pub async fn submit(&self, order: Pending) -> Outcome {
        let (reply, mut answer) = oneshot::channel();
        if let Some(ticket) = self.enqueue(order, reply)? {
            match tokio::time::timeout(self.shared.queue_timeout, &mut answer).await {
                Ok(outcome) => return outcome.unwrap_or_else(|_| Err(writer_gone())),
                Err(_) if self.withdraw(ticket) => return Err(overloaded()),
                // Taken meanwhile: its transaction decides.
                Err(_) => {}
            }
        }
        answer.await.unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Hands `order` to an idle writer (`None`) or queues it (its ticket).
    fn enqueue(
        &self,
        order: Pending,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<Option<u64>, OrderError> {
        let mut state = self.lock();
        if state.closed {
            return Err(OrderError::Unavailable(tonic::Status::unavailable(
                "the service is shutting down; retry",
            )));
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let mut item = Queued {
            ticket,
            since: Instant::now(),
            order,
            reply,
        };
        if state.queue.is_empty() {
            while let Some(writer) = state.idle.pop() {
                match writer.try_send(vec![item]) {
                    Ok(()) => return Ok(None),
                    // That writer is gone (its task ended): try another.
                    Err(e) => item = e.into_inner().pop().expect("the group just sent"),
                }
            }
        }
        if state.queue.len() >= self.shared.settings.queue_max {
            return Err(overloaded());
        }
        state.queue.push_back(item);
        common::metrics::order_intake_queued(state.queue.len());
        Ok(Some(ticket))
    }

    /// Takes a request that no writer took out of the queue; false when a
    /// writer has it.
    fn withdraw(&self, ticket: u64) -> bool {
        let mut state = self.lock();
        let Some(at) = state.queue.iter().position(|q| q.ticket == ticket) else {
            return false;
        };
        state.queue.remove(at);
        common::metrics::order_intake_queued(state.queue.len());
        true
    }

    /// The next group: what is queued, up to the group maximum, less the
    /// requests whose caller has gone (cancelled: nobody would learn of
    /// their order).
    fn take(&self, state: &mut State) -> Vec<Queued> {
        let mut group = Vec::new();
        while group.len() < self.shared.settings.group_max {
            let Some(item) = state.queue.pop_front() else {
                break;
            };
            if !item.reply.is_closed() {
                group.push(item);
            }
        }
        common::metrics::order_intake_queued(state.queue.len());
        group
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One writer: writes groups until `stop`, then what is still queued.
    /// Run it as a last task of the service (see the module docs).
    pub async fn run(self, stop: CancellationToken) -> TaskResult {
        let (mailbox, mut inbox) = mpsc::channel(1);
        loop {
            let group = {
                let mut state = self.lock();
                let group = self.take(&mut state);
                if group.is_empty() {
                    if stop.is_cancelled() {
                        state.closed = true;
                        return Ok(());
                    }
                    state.idle.push(mailbox.clone());
                }
                group
            };
            if !group.is_empty() {
                self.write(group).await;
                continue;
            }
            tokio::select! {
                handed = inbox.recv() => {
                    self.write(handed.expect("this writer holds a sender")).await;
                }
                () = stop.cancelled() => {
                    {
                        let mut state = self.lock();
                        state.closed = true;
                        state.idle.retain(|m| !m.same_channel(&mailbox));
                    }
                    // A request handed over just before.
                    if let Ok(group) = inbox.try_recv() {
                        self.write(group).await;
                    }
                }
            }
        }
    }

    /// Writes a group and answers its callers.
    async fn write(&self, group: Vec<Queued>) {
        common::metrics::order_group(group.len());
        let taken = Instant::now();
        let (orders, answers): (Vec<Pending>, Vec<_>) = group
            .into_iter()
            .map(|q| (q.order, (q.reply, taken.saturating_duration_since(q.since))))
            .unzip();
        let outcomes = self.write_group(&orders).await;
        let written = taken.elapsed();
        for ((reply, queued), outcome) in answers.into_iter().zip(outcomes) {
            common::metrics::order_intake_stages(queued, written);
            // A caller that has gone meanwhile learns nothing; its order stands.
            let _ = reply.send(outcome);
        }
        self.shared.outbox.notify();
    }

    /// The outcome of each order of the group, in order.
    async fn write_group(&self, orders: &[Pending]) -> Vec<Outcome> {
        let all: Vec<&Pending> = orders.iter().collect();
        let error = match self.attempt_until_deadline(&all).await {
            Ok(outcomes) => return outcomes,
            Err(e) => e,
        };
        if orders.len() == 1 || db::is_unavailable(&error) {
            return failed(&error, orders.len());
        }
        tracing::warn!(%error, size = orders.len(),
            "group-commit transaction failed; replaying its requests one per transaction");
        let mut outcomes = Vec::with_capacity(orders.len());
        for order in orders {
            match self.attempt_until_deadline(&[order]).await {
                Ok(mut one) => outcomes.push(one.pop().expect("one outcome per order")),
                Err(e) => outcomes.extend(failed(&e, 1)),
            }
        }
        outcomes
    }

    /// [`Self::attempt`], retried with backoff while the database is
    /// unreachable, for at most the queue timeout (the callers wait).
    async fn attempt_until_deadline(&self, orders: &[&Pending]) -> sqlx::Result<Vec<Outcome>> {
        let give_up = Instant::now() + self.shared.queue_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let error = match self.attempt(orders, give_up).await {
                Ok(written) => {
                    common::metrics::orders_created(written.created);
                    tracing::debug!(
                        size = orders.len(),
                        created = written.created,
                        statements = written.statements,
                        "group committed"
                    );
                    return Ok(written.outcomes);
                }
                Err(e) if db::is_unavailable(&e) => e,
                Err(e) => return Err(e),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay >= give_up {
                return Err(error);
            }
            tracing::debug!(%error, ?delay, "database unavailable; retrying the group");
            tokio::time::sleep(delay).await;
        }
    }

    /// One try at writing a group on one connection: the keys' lookup, the
    /// transaction, then the answers of requests that did not insert.
    /// Safe to repeat (see the module docs on retries). Only the wait for a
    /// connection ends at `give_up`: a transaction under way is never cut
    /// off, since its commit may be what the cut would hide.
    async fn attempt(&self, orders: &[&Pending], give_up: Instant) -> sqlx::Result<Written> {
        let left = give_up.saturating_duration_since(Instant::now());
        let mut conn = tokio::time::timeout(left, self.shared.pool.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        let mut statements = 0;
        let keys: Vec<Option<(&str, &[u8])>> = orders.iter().map(|o| o.key()).collect();
        let lookup = idempotency::distinct_keys(&keys);
        if !lookup.is_empty() {
            statements += 1;
        }
        let stored = store::stored_keys(&mut conn, &lookup).await?;
        let steps = idempotency::plan(&keys, &stored);
        let inserts: Vec<&Pending> = orders
            .iter()
            .zip(&steps)
            .filter(|(_, step)| **step == Step::Insert)
            .map(|(o, _)| *o)
            .collect();
        if !inserts.is_empty() {
            statements += 1; // orders, items and outbox in one statement
        }
        let mut written =
            store::insert_orders(&mut conn, &inserts, self.shared.order_deadline).await?;
        // Skipped by ON CONFLICT: an earlier attempt's (committed after all),
        // or a key that another replica inserted first.
        let skipped: Vec<Uuid> = inserts
            .iter()
            .map(|o| o.order_id)
            .filter(|id| !written.contains_key(id))
            .collect();
        if !skipped.is_empty() {
            statements += 1;
            written.extend(store::created_at(&mut conn, &skipped).await?);
        }
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(orders.len());
        let mut created = 0;
        for (order, step) in orders.iter().zip(steps) {
            let key = || order.key().map_or("", |(k, _)| k).to_owned();
            let outcome = match step {
                Step::Insert => {
                    if let Some(at) = written.get(&order.order_id) {
                        created += 1;
                        Ok(order.to_order(*at))
                    } else {
                        statements += 3;
                        raced(&mut conn, order).await?
                    }
                }
                Step::Follow(leader) => match &outcomes[leader] {
                    Ok(order) => Ok(order.clone()),
                    Err(_) => Err(OrderError::IdempotencyConflict(key())),
                },
                Step::Replay(order_id) => {
                    statements += 2;
                    let found = store::load(&mut conn, order_id).await?;
                    Ok(found.ok_or(sqlx::Error::RowNotFound)?)
                }
                Step::Conflict => Err(OrderError::IdempotencyConflict(key())),
            };
            outcomes.push(outcome);
        }
        Ok(Written {
            outcomes,
            created,
            statements,
        })
    }
}

/// What an attempt wrote.
struct Written {
    outcomes: Vec<Outcome>,
    /// New orders committed (replays and conflicts excluded).
    created: u64,
    /// Round trips to the database, for the debug log.
    statements: usize,
}

/// A keyed order that another replica's transaction inserted first: that
/// order if it is the same request, else a conflict (as written alone).
async fn raced(conn: &mut sqlx::PgConnection, order: &Pending) -> sqlx::Result<Outcome> {
    // Only the key can conflict (order ids are fresh UUIDs, and an earlier
    // attempt's are found before this).
    let (key, hash) = order.key().ok_or(sqlx::Error::RowNotFound)?;
    match store::by_idempotency_key(conn, key, hash).await {
        Ok(Some(existing)) => Ok(Ok(existing)),
        Ok(None) => Ok(Err(OrderError::IdempotencyConflict(key.to_owned()))),
        Err(OrderError::Db(e)) => Err(e),
        Err(other) => Ok(Err(other)),
    }
}

/// Every caller of a failed transaction gets the same answer; its cause is
/// logged once, here, not per caller.
fn failed(error: &sqlx::Error, callers: usize) -> Vec<Outcome> {
    let unavailable = db::is_unavailable(error);
    if unavailable {
        tracing::warn!(%error, callers, "database unavailable; orders not written");
    } else {
        tracing::error!(%error, callers, "database error; orders not written");
    }
    (0..callers)
        .map(|_| Err(OrderError::WriteFailed { unavailable }))
        .collect()
}

fn overloaded() -> OrderError {
    OrderError::Overloaded {
        retry_after: Duration::from_secs(1),
    }
}

/// A writer ended with the request in its group: it panicked, and the
/// service is stopping.
fn writer_gone() -> OrderError {
    OrderError::WriteFailed { unavailable: true }
}

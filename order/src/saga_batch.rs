//! The set-based saga consumer: a whole batch of `payments` and `inventory`
//! events in at most four statements, instead of four to six per event.
//!
//! ```text
//! lock the batch's distinct orders   SELECT … WHERE order_id = ANY($1)
//!                                     ORDER BY order_id FOR UPDATE
//! fold the events, in order, over the rows in memory (crate::saga)
//! write the changed rows             UPDATE orders … FROM UNNEST(…)
//! tell watchers                      pg_notify for the orders a result moved
//! publish the decisions              one outbox insert, each event continuing
//!                                     the trace of the record that caused it
//! ```
//!
//! Round trips to PostgreSQL are what the pipeline spends its database CPU
//! on, so this is the path every batch takes. The per-record replay of a
//! batch that failed runs the same code on a batch of one ([`Path::Record`]),
//! so both apply the rules of [`crate::saga::SagaState::apply`] the same
//! way: `updated_at` is `now()`, the transaction's start; a side's first
//! report wins; only a PENDING order is decided.
//!
//! Rows are locked in key order, so two order replicas (one consuming a
//! `payments` partition, another the matching `inventory` one) cannot
//! deadlock on a pair of orders; the deadline sweeper skips locked rows.
//! A bad record (unknown order, malformed id, invalid outcome) fails the
//! whole batch here; the consume loop then rolls it back and replays it one
//! record per transaction (this code on a batch of one), which isolates and
//! dead-letters that record alone.

use std::collections::BTreeMap;

use common::{
    consumer::{EventMeta, HandlerError, parse_id},
    outbox::{self, OutboxEvent},
};
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    consumer::{
        LockedRow, SAGA_BATCHES, SagaEvent, cancelled_event, confirmed_event, count_applied,
        locked_columns,
    },
    domain::{InventoryStatus, PaymentStatus},
    saga::{Decided, Report, SagaState},
};

/// Which of the consume loop's paths is applying: a whole batch
/// (`EventHandler::apply_all`), or one record of a batch that failed and is
/// replayed record by record (`EventHandler::apply`). Counted apart
/// (`shop_order_saga_events_total{path}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Set,
    Record,
}

/// One locked order while the batch is folded over it.
struct Folding {
    customer_id: String,
    state: SagaState,
    changed: bool,
    notify: bool,
}

/// Applies a batch's new events, in order, in the caller's transaction;
/// returns how many orders it decided (confirmed or cancelled).
pub(crate) async fn apply(
    conn: &mut PgConnection,
    orders_topic: &str,
    events: Vec<(&EventMeta, SagaEvent)>,
    path: Path,
) -> Result<u64, HandlerError> {
    let total = events.len();
    let mut reports = Vec::with_capacity(total);
    for (meta, event) in events {
        let (order_id, report) = event.into_report()?;
        meta.span.record("order_id", order_id.as_str());
        reports.push((meta, parse_id("order id", &order_id)?, report));
    }

    let mut ids: Vec<Uuid> = reports.iter().map(|(_, id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let locked: Vec<LockedRow> = sqlx::query_as(concat!(
        "SELECT ",
        locked_columns!(),
        " FROM orders WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: BTreeMap<Uuid, Folding> = locked
        .into_iter()
        .map(|r| {
            let folding = Folding {
                customer_id: r.customer_id,
                state: r.state,
                changed: false,
                notify: false,
            };
            (r.order_id, folding)
        })
        .collect();
    if let Some(unknown) = ids.iter().find(|id| !rows.contains_key(id)) {
        return Err(HandlerError::Permanent(format!("unknown order {unknown}")));
    }

    let mut decisions: Vec<OutboxEvent> = Vec::new();
    let (mut confirmed, mut cancelled) = (0, 0);
    for (meta, id, report) in reports {
        let row = rows.get_mut(&id).expect("every order was locked above");
        // One `order status update` hop per result in the order's trace,
        // whichever path applied it.
        let span = match &report {
            Report::Result(side, _) => tracing::info_span!(
                parent: &meta.span,
                common::telemetry::trace_only::ORDER_STATUS_UPDATE,
                order_id = %id,
                side = ?side
            ),
            Report::Compensated(_) => tracing::Span::none(),
        };
        let step = row.state.apply(report);
        row.changed |= step.changed;
        row.notify |= step.notify;
        let event = match step.decided {
            None => continue,
            Some(Decided::Confirmed) => {
                confirmed += 1;
                confirmed_event(orders_topic, id, &row.customer_id)
            }
            Some(Decided::Cancelled(reason)) => {
                cancelled += 1;
                cancelled_event(orders_topic, id, &row.customer_id, &reason)
            }
        };
        decisions.push(event.caused_by(&span));
    }

    let notified: Vec<Uuid> = rows
        .iter()
        .filter(|(_, r)| r.notify)
        .map(|(id, _)| *id)
        .collect();
    let written = write_all(conn, &rows, &notified, &decisions).await?;

    // Counted when the consume loop's transaction commits.
    if confirmed > 0 {
        common::metrics::orders_decided("CONFIRMED", confirmed);
    }
    if cancelled > 0 {
        common::metrics::orders_decided("CANCELLED", cancelled);
    }
    if path == Path::Record {
        count_applied("record", total);
        return Ok(confirmed + cancelled);
    }
    count_applied("set", total);
    common::metrics::count_on_commit(SAGA_BATCHES, Vec::new(), 1);
    let statements = 1 + usize::from(written > 0 || !notified.is_empty() || !decisions.is_empty());
    tracing::debug!(
        events = total,
        orders = ids.len(),
        written,
        decided = decisions.len(),
        statements,
        "saga batch applied set-based"
    );
    Ok(confirmed + cancelled)
}

/// Writes every changed row, notifies the orders' watchers and enqueues
/// the decisions, all in one statement (one round trip, whatever the
/// batch's size); returns how many rows it wrote. The notifications go out
/// when, and only if, the consume loop's transaction commits.
async fn write_all(
    conn: &mut PgConnection,
    rows: &BTreeMap<Uuid, Folding>,
    notified: &[Uuid],
    decisions: &[OutboxEvent],
) -> sqlx::Result<usize> {
    let changed: Vec<(&Uuid, &SagaState)> = rows
        .iter()
        .filter(|(_, r)| r.changed)
        .map(|(id, r)| (id, &r.state))
        .collect();
    if changed.is_empty() && notified.is_empty() && decisions.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = changed.iter().map(|(id, _)| **id).collect();
    let statuses: Vec<&str> = changed.iter().map(|(_, s)| s.status.as_str()).collect();
    let reasons: Vec<&str> = changed.iter().map(|(_, s)| s.reason.as_str()).collect();
    let payments: Vec<Option<&str>> = changed
        .iter()
        .map(|(_, s)| s.payment_status.map(PaymentStatus::as_str))
        .collect();
    let payment_reasons: Vec<&str> = changed
        .iter()
        .map(|(_, s)| s.payment_reason.as_str())
        .collect();
    let inventories: Vec<Option<&str>> = changed
        .iter()
        .map(|(_, s)| s.inventory_status.map(InventoryStatus::as_str))
        .collect();
    let inventory_reasons: Vec<&str> = changed
        .iter()
        .map(|(_, s)| s.inventory_reason.as_str())
        .collect();
    // Every decision has its record's context (caused_by), so the write
    // span's is a default that is never used; as in outbox::enqueue.
    let write = outbox::EventWrite::of(decisions);
    // $1..$7 are the outbox's columns (outbox::Columns). A SELECT in WITH
    // runs only when referenced: the final SELECT references the
    // notifications; the UPDATE and the INSERT run regardless.
    write
        .query(concat!(
            "WITH written AS (
                 UPDATE orders o SET status = u.status, reason = u.reason,
                                     payment_status = u.payment_status,
                                     payment_reason = u.payment_reason,
                                     inventory_status = u.inventory_status,
                                     inventory_reason = u.inventory_reason, updated_at = now()
                 FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[],
                             $13::text[], $14::text[])
                      AS u(order_id, status, reason, payment_status, payment_reason,
                           inventory_status, inventory_reason)
                 WHERE o.order_id = u.order_id
             ), events AS (",
            common::outbox_insert_unnest!(),
            "), notified AS (
                 SELECT pg_notify($15, id::text) FROM UNNEST($16::uuid[]) AS id
             )
             SELECT count(*) FROM notified",
        ))
        .bind(&ids)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&payments)
        .bind(&payment_reasons)
        .bind(&inventories)
        .bind(&inventory_reasons)
        .bind(crate::watch::CHANNEL)
        .bind(notified)
        .execute(conn)
        .instrument(write.span())
        .await?;
    Ok(ids.len())
}

//! Static group membership (`KAFKA_GROUP_INSTANCE_ID`): a consumer killed
//! with SIGKILL and started again under the same instance id takes its own
//! place in the group back, instead of joining next to its dead self and
//! stopping the whole group until that one's session expires.
//!
//! The service runs as its real binary against the shared broker; the
//! group is read with `DescribeGroups`, as `kafka-consumer-groups
//! --describe --members` would.

use std::{sync::Arc, time::Duration};

use e2e::{create_database, eventually, process::ServiceProcess, test_kafka_config, unique_id};
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A client that only describes groups.
fn admin(id: &str) -> Arc<BaseConsumer> {
    Arc::new(
        common::kafka::base_config(&test_kafka_config(id, "admin"))
            .create()
            .expect("admin client"),
    )
}

/// The only member of `group` once the group is stable with one member.
async fn sole_member(admin: &Arc<BaseConsumer>, group: &str) -> String {
    eventually("one member in a stable group", || async {
        match describe(admin, group).await {
            (state, ids) if state == "Stable" && ids.len() == 1 => ids.into_iter().next(),
            _ => None,
        }
    })
    .await
}

/// The group's state and its members' ids, as the broker describes them.
async fn describe(admin: &Arc<BaseConsumer>, group: &str) -> (String, Vec<String>) {
    let (admin, group) = (admin.clone(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let list = admin
            .fetch_group_list(Some(&group), Duration::from_secs(5))
            .expect("describe the group");
        list.groups()
            .iter()
            .find(|g| g.name() == group)
            .map(|g| {
                let ids = g.members().iter().map(|m| m.id().to_owned()).collect();
                (g.state().to_owned(), ids)
            })
            .unwrap_or_default()
    })
    .await
    .expect("describe task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_killed_and_restarted_takes_its_own_place_back() {
    let id = unique_id();
    let url = create_database(format!("t_{id}_payments")).await;
    let group = format!("t{id}-payment");
    // Like a StatefulSet pod's name: distinct from the client id (the
    // service name), which prefixes a dynamic member's id instead.
    let instance = format!("t{id}-payment-0");
    let env = [("KAFKA_GROUP_INSTANCE_ID", instance.clone())];
    let admin = admin(&id);

    let payment = ServiceProcess::start("payment", &id, &url, &env);
    e2e::wait_serving(payment.grpc, "").await;
    // The broker names a static member after its instance id.
    let first = sole_member(&admin, &group).await;
    assert!(
        first.starts_with(&format!("{instance}-")),
        "member {first} is not named after its instance id {instance}"
    );

    // SIGKILL: no LeaveGroup, the member stays in the group until its
    // session expires, unless someone takes its place.
    drop(payment);
    let payment = ServiceProcess::start("payment", &id, &url, &env);
    e2e::wait_serving(payment.grpc, "").await;
    let second = eventually("the restarted member in a stable group", || async {
        let (state, ids) = describe(&admin, &group).await;
        // A dynamic member would show up next to the dead one here, for
        // the 6 s of its session.
        assert!(
            ids.len() <= 1,
            "the restarted instance joined next to its dead self: {ids:?} ({state})"
        );
        match ids.as_slice() {
            [only] if state == "Stable" && *only != first => Some(only.clone()),
            _ => None,
        }
    })
    .await;
    assert!(second.starts_with(&format!("{instance}-")), "{second}");
    drop(payment);
}

/// Two live instances under one instance id (a Deployment given one
/// `KAFKA_GROUP_INSTANCE_ID` for all its pods): the broker fences the older.
/// A fenced member joins again (what cures a broker restart that outlasted
/// its session), which fences the other, which does the same; out of
/// rejoins (three a minute), the first stops with an error instead of
/// fencing the other forever or serving on without consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_under_one_instance_id_fence_each_other_until_one_exits_non_zero() {
    let id = unique_id();
    let url = create_database(format!("t_{id}_payments")).await;
    let env = [("KAFKA_GROUP_INSTANCE_ID", format!("t{id}-payment-0"))];
    let admin = admin(&id);
    let group = format!("t{id}-payment");

    let mut first = ServiceProcess::start("payment", &id, &url, &env);
    e2e::wait_serving(first.grpc, "").await;
    let joined = sole_member(&admin, &group).await;
    let mut second = ServiceProcess::start("payment", &id, &url, &env);
    e2e::wait_serving(second.grpc, "").await;

    let status = first.exit_status().await;
    assert!(
        !status.success(),
        "the fenced instance exited with {status}"
    );
    let log = first.log();
    assert!(
        log.contains("joining again as a new consumer")
            && log.contains("the Kafka consumer failed for good"),
        "the first instance did not join again, then stop saying why:\n{log}"
    );
    second.assert_running();
    let log = second.log();
    assert!(
        log.contains("joining again as a new consumer"),
        "the second instance was not fenced in turn:\n{log}"
    );
    let (_, ids) = describe(&admin, &group).await;
    assert!(
        ids.len() == 1 && ids[0] != joined,
        "the second instance holds the place: {ids:?}"
    );
}

/// A consumer whose group join never completes is replaced by a new one
/// (after `OUT_OF_GROUP_LIMIT`, 30 s), counted in
/// `shop_consumers_replaced_total{reason="out_of_group"}`. The join is held
/// open for real: a member that stops polling (a plain consumer here, with a
/// five-minute rebalance timeout) never answers the rebalance the service's
/// join starts, so the broker keeps the service's `JoinGroup` waiting, as
/// the fault suite once saw a consumer never join again after a broker
/// restart. Once that member leaves, the service's consumer is assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_join_never_completes_is_replaced() {
    let id = unique_id();
    let url = create_database(format!("t_{id}_payments")).await;
    let group = format!("t{id}-payment");
    let kafka = test_kafka_config(&id, "payment");
    common::kafka::ensure_topics(
        &kafka,
        &common::topics::ALL,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("topics");

    // The member that holds every rebalance open: assigned, then silent
    // (librdkafka heartbeats on its own thread, so its session lives on).
    let holder: BaseConsumer = common::kafka::base_config(&kafka)
        .set("group.id", &group)
        .set("session.timeout.ms", "30000")
        .set("max.poll.interval.ms", "300000")
        .create()
        .expect("holder");
    holder
        .subscribe(&[kafka.topic(common::topics::ORDERS).as_str()])
        .expect("subscribe");
    let holder = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        while holder.assignment().expect("assignment").count() == 0 {
            assert!(
                start.elapsed() < e2e::DEADLINE,
                "the holder got no partitions"
            );
            let _ = holder.poll(Duration::from_millis(100));
        }
        holder
    })
    .await
    .expect("holder task");

    let mut payment = ServiceProcess::start("payment", &id, &url, &[]);
    e2e::wait_serving(payment.grpc, "").await;
    // Only a consumer left without an assignment for 30 s is replaced.
    eventually("payment to replace its stuck consumer", || async {
        payment
            .log()
            .contains("the group's join never completed")
            .then_some(())
    })
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", payment.metrics))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shop_consumers_replaced_total{reason=\"out_of_group\"}")),
        "the replacement is not counted:\n{metrics}"
    );

    // The holder leaves: the service's consumer takes the partitions.
    tokio::task::spawn_blocking(move || drop(holder))
        .await
        .expect("close the holder");
    sole_member(&admin(&id), &group).await;
    // The replaced consumer is closed on a detached thread: nothing of it
    // keeps the service from stopping.
    let status = payment.terminate().await;
    assert!(
        status.success(),
        "payment exited with {status}:\n{}",
        payment.log()
    );
}

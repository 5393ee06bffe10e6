//! What each request of a group-commit group does about its idempotency
//! key, decided in Rust before anything is written (pure, unit-tested).
//!
//! The rules are those of a request written alone, applied in the group's
//! order as if its requests had arrived one after the other:
//!
//! - no key: a new order;
//! - a key already in the table (the group's one lookup): the same request
//!   (same hash) gets that order back, another gets `ALREADY_EXISTS`;
//! - a key first seen in the group: this request writes the order (it
//!   *leads* the key);
//! - a key an earlier request of the group leads: the same request follows
//!   the leader (gets its order, so two concurrent retries make one order),
//!   another gets `ALREADY_EXISTS`.
//!
//! A key that another order replica inserts meanwhile is not known here:
//! `ON CONFLICT DO NOTHING` skips that row, and the writer resolves it after
//! the commit, as a request written alone would.

use std::{collections::HashMap, hash::BuildHasher};

use uuid::Uuid;

/// A key's order already stored, as the group's lookup found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub order_id: Uuid,
    /// NULL for rows written before hashes were kept: never the same request.
    pub request_hash: Option<Vec<u8>>,
}

/// What one request of a group does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write a new order (no key, or the first request with its key).
    Insert,
    /// The same request as the one at this index of the group, which
    /// inserts: answer with its outcome.
    Follow(usize),
    /// The same request as a stored order: answer with that order.
    Replay(Uuid),
    /// The key names a different request: `ALREADY_EXISTS`.
    Conflict,
}

/// The step of each request; `keys[i]` is request `i`'s key and request
/// hash, if it has a key.
#[must_use]
pub fn plan<S: BuildHasher>(
    keys: &[Option<(&str, &[u8])>],
    stored: &HashMap<String, Stored, S>,
) -> Vec<Step> {
    // Key → (index of its leader in the group, the leader's hash).
    let mut leaders: HashMap<&str, (usize, &[u8])> = HashMap::new();
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let Some((key, hash)) = *key else {
                return Step::Insert;
            };
            if let Some(found) = stored.get(key) {
                return if found.request_hash.as_deref() == Some(hash) {
                    Step::Replay(found.order_id)
                } else {
                    Step::Conflict
                };
            }
            match leaders.get(key) {
                Some(&(leader, leader_hash)) if leader_hash == hash => Step::Follow(leader),
                Some(_) => Step::Conflict,
                None => {
                    leaders.insert(key, (i, hash));
                    Step::Insert
                }
            }
        })
        .collect()
}

/// The distinct keys of a group, for its one lookup.
#[must_use]
pub fn distinct_keys<'a>(keys: &[Option<(&'a str, &[u8])>]) -> Vec<&'a str> {
    let mut out: Vec<&str> = keys.iter().flatten().map(|(k, _)| *k).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"hash-a";
    const B: &[u8] = b"hash-b";

    fn stored(entries: &[(&str, Uuid, Option<&[u8]>)]) -> HashMap<String, Stored> {
        entries
            .iter()
            .map(|(k, id, h)| {
                let s = Stored {
                    order_id: *id,
                    request_hash: h.map(<[u8]>::to_vec),
                };
                ((*k).to_owned(), s)
            })
            .collect()
    }

    #[test]
    fn requests_without_keys_all_insert() {
        let steps = plan(&[None, None, None], &HashMap::new());
        assert_eq!(steps, vec![Step::Insert; 3]);
    }

    #[test]
    fn one_key_twice_with_the_same_request_makes_one_order() {
        let steps = plan(
            &[Some(("k", A)), None, Some(("k", A)), Some(("k", A))],
            &HashMap::new(),
        );
        assert_eq!(
            steps,
            vec![Step::Insert, Step::Insert, Step::Follow(0), Step::Follow(0)]
        );
    }

    #[test]
    fn one_key_with_a_different_request_later_in_the_group_conflicts() {
        let steps = plan(
            &[Some(("k", A)), Some(("k", B)), Some(("k", A))],
            &HashMap::new(),
        );
        assert_eq!(steps, vec![Step::Insert, Step::Conflict, Step::Follow(0)]);
    }

    #[test]
    fn stored_keys_replay_or_conflict() {
        let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
        let stored = stored(&[("old", x, Some(A)), ("legacy", y, None)]);
        let steps = plan(
            &[
                Some(("old", A)),
                Some(("old", B)),
                Some(("legacy", A)),
                Some(("new", B)),
            ],
            &stored,
        );
        assert_eq!(
            steps,
            vec![
                Step::Replay(x),
                Step::Conflict,
                Step::Conflict,
                Step::Insert
            ]
        );
    }

    #[test]
    fn keys_are_looked_up_once_each() {
        let keys = [Some(("b", A)), None, Some(("a", B)), Some(("b", A))];
        assert_eq!(distinct_keys(&keys), vec!["a", "b"]);
        assert!(distinct_keys(&[None, None]).is_empty());
    }
}

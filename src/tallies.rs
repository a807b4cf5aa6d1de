//! Verification counts between writes (SPEC §8 analytics), as plain memory: one tally per
//! (database, key, code, minute) in an open-addressing table with linear probing. It lives in
//! shared memory (`analytics`), but nothing here knows that: every operation is a pure
//! function of the slice, unit-tested against a `HashMap`. A database's writer takes all of its
//! tallies at once (`take`), so entries are never removed one by one.

/// Key ids take at most 128 bytes (keys.rs); NOT_FOUND attempts count under the empty id.
pub const ID_BYTES: usize = 128;

/// Which tally: the database, the key (its id and creation time; "" and 0 for NOT_FOUND), the
/// verification code (`verify::Code` as u8) and the minute (epoch minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TallyKey<'a> {
    pub db: u32,
    pub id: &'a str,
    pub created_us: i64,
    pub code: u8,
    pub minute: i64,
}

/// One tally. `db == 0` marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Tally {
    pub db: u32,
    pub code: u8,
    id_len: u8,
    pub created_us: i64,
    pub minute: i64,
    /// Verifications counted, and the cost they spent.
    pub count: i64,
    pub cost: i64,
    id: [u8; ID_BYTES],
}

pub const FREE: Tally = Tally {
    db: 0,
    code: 0,
    id_len: 0,
    created_us: 0,
    minute: 0,
    count: 0,
    cost: 0,
    id: [0; ID_BYTES],
};

impl Tally {
    /// A tally of `count` verifications of `key` spending `cost`; None when the id does not fit.
    pub fn new(key: &TallyKey<'_>, count: i64, cost: i64) -> Option<Tally> {
        let bytes = key.id.as_bytes();
        if bytes.len() > ID_BYTES {
            return None;
        }
        let mut t = Tally {
            db: key.db,
            code: key.code,
            id_len: bytes.len() as u8,
            created_us: key.created_us,
            minute: key.minute,
            count,
            cost,
            id: FREE.id,
        };
        t.id[..bytes.len()].copy_from_slice(bytes);
        Some(t)
    }

    pub fn id(&self) -> &str {
        std::str::from_utf8(&self.id[..usize::from(self.id_len)]).unwrap_or("")
    }

    pub fn key(&self) -> TallyKey<'_> {
        TallyKey {
            db: self.db,
            id: self.id(),
            created_us: self.created_us,
            code: self.code,
            minute: self.minute,
        }
    }
}

fn home(key: &TallyKey<'_>, capacity: usize) -> usize {
    // Over every part of the key.
    let hash = crate::slots::fnv1a(
        key.db
            .to_le_bytes()
            .iter()
            .chain(key.id.as_bytes())
            .chain(&key.created_us.to_le_bytes())
            .chain(&[key.code])
            .chain(&key.minute.to_le_bytes()),
    );
    (hash % capacity as u64) as usize
}

/// What `add` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// To a tally that was there.
    Existing,
    /// To a new tally (the writer may need waking).
    New,
    /// Nothing: the table is full (or the id does not fit).
    Full,
}

/// Adds `count` verifications spending `cost` to `key`'s tally. `used` counts occupied slots; a
/// new tally is refused once seven-eighths are taken, so that probes stay short (the writer
/// empties the table from three-quarters on).
pub fn add(
    slots: &mut [Tally],
    used: &mut usize,
    key: &TallyKey<'_>,
    count: i64,
    cost: i64,
) -> Added {
    let bytes = key.id.as_bytes();
    let n = slots.len();
    if key.db == 0 || bytes.len() > ID_BYTES || n == 0 {
        return Added::Full;
    }
    let start = home(key, n);
    for probe in 0..n {
        let i = (start + probe) % n;
        let t = &mut slots[i];
        if t.db == 0 {
            if (*used + 1) * 8 > n * 7 {
                return Added::Full;
            }
            let Some(new) = Tally::new(key, count, cost) else {
                return Added::Full;
            };
            *t = new;
            *used += 1;
            return Added::New;
        }
        if t.key() == *key {
            t.count = t.count.saturating_add(count);
            t.cost = t.cost.saturating_add(cost);
            return Added::Existing;
        }
    }
    Added::Full
}

/// Takes every tally of database `db` out of the table (the others are placed again, so that
/// their probe chains stay whole).
pub fn take(slots: &mut [Tally], used: &mut usize, db: u32) -> Vec<Tally> {
    if !slots.iter().any(|t| t.db == db) {
        return Vec::new();
    }
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for t in slots.iter_mut().filter(|t| t.db != 0) {
        if t.db == db {
            taken.push(*t);
        } else {
            kept.push(*t);
        }
        *t = FREE;
    }
    *used = 0;
    for t in &kept {
        add(slots, used, &t.key(), t.count, t.cost);
    }
    taken
}

/// Whether database `db` has tallies waiting.
pub fn any_of(slots: &[Tally], db: u32) -> bool {
    slots.iter().any(|t| t.db == db)
}

/// What a digest sums, per minute: (key id, created µs, code) → (count, cost).
pub type Sums = std::collections::HashMap<(String, i64, u8), (i64, i64)>;

/// The writer's running sums of the tallies it has written as batch rows, per minute, and how
/// many batch rows each minute got (one per write that had tallies of it). Once the minute is
/// over, its sums are what compacting its batch rows would compute, provided the table holds
/// exactly those rows: the writer then inserts them as they are instead of unnesting and summing
/// a dozen batches again (`analytics::compact`).
#[derive(Debug, Default)]
pub struct Digests {
    minutes: std::collections::BTreeMap<i64, Digest>,
    entries: usize,
    limit: usize,
}

#[derive(Debug, Default)]
struct Digest {
    batches: usize,
    /// False once a tally did not fit under the limit: the sums are incomplete for good.
    complete: bool,
    sums: Sums,
}

impl Digests {
    /// Digests holding at most `limit` sums in all (beyond, a minute's digest is given up and
    /// its batches are compacted the slow way).
    pub fn new(limit: usize) -> Self {
        Digests {
            limit,
            ..Default::default()
        }
    }

    /// Adds the tallies of one write (a batch row per minute among them).
    pub fn remember(&mut self, written: &[Tally]) {
        let mut seen = std::collections::BTreeSet::new();
        for t in written {
            let digest = self.minutes.entry(t.minute).or_insert_with(|| Digest {
                complete: true,
                ..Default::default()
            });
            if seen.insert(t.minute) {
                digest.batches += 1;
            }
            if !digest.complete {
                continue;
            }
            let key = (t.id().to_owned(), t.created_us, t.code);
            if !digest.sums.contains_key(&key) && self.entries >= self.limit {
                self.entries -= digest.sums.len();
                digest.sums = Sums::new();
                digest.complete = false;
                continue;
            }
            let sum = digest.sums.entry(key).or_insert_with(|| {
                self.entries += 1;
                (0, 0)
            });
            sum.0 = sum.0.saturating_add(t.count);
            sum.1 = sum.1.saturating_add(t.cost);
        }
    }

    /// Takes `minute`'s sums when they are complete and cover exactly `batches` batch rows;
    /// the minute is forgotten either way.
    pub fn take(&mut self, minute: i64, batches: usize) -> Option<Sums> {
        let digest = self.minutes.remove(&minute)?;
        self.entries -= digest.sums.len();
        (digest.complete && digest.batches == batches).then_some(digest.sums)
    }

    /// Forgets the minutes before `minute` (their batches were compacted some other way).
    pub fn forget_before(&mut self, minute: i64) {
        let kept = self.minutes.split_off(&minute);
        for digest in std::mem::replace(&mut self.minutes, kept).into_values() {
            self.entries -= digest.sums.len();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    type Model = HashMap<(u32, String, i64, u8, i64), (i64, i64)>;

    fn key(db: u32, id: &str, code: u8, minute: i64) -> TallyKey<'_> {
        TallyKey {
            db,
            id,
            created_us: 7,
            code,
            minute,
        }
    }

    #[test]
    fn tallies_add_up_per_key_code_and_minute() {
        let mut slots = vec![FREE; 16];
        let mut used = 0;
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "a", 0, 5), 1, 3),
            Added::New
        );
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "a", 0, 5), 1, 2),
            Added::Existing
        );
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "a", 1, 5), 1, 0),
            Added::New
        );
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "a", 0, 6), 1, 1),
            Added::New
        );
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "", 1, 6), 1, 0),
            Added::New
        );
        assert_eq!(
            add(&mut slots, &mut used, &key(2, "a", 0, 5), 1, 1),
            Added::New
        );
        assert_eq!(used, 5);
        let mut taken = take(&mut slots, &mut used, 1);
        taken.sort_by_key(|t| (t.id().to_owned(), t.code, t.minute));
        let seen: Vec<(&str, u8, i64, i64, i64)> = taken
            .iter()
            .map(|t| (t.id(), t.code, t.minute, t.count, t.cost))
            .collect();
        assert_eq!(
            seen,
            [
                ("", 1, 6, 1, 0),
                ("a", 0, 5, 2, 5),
                ("a", 0, 6, 1, 1),
                ("a", 1, 5, 1, 0)
            ]
        );
        assert_eq!(used, 1);
        assert!(any_of(&slots, 2) && !any_of(&slots, 1));
    }

    #[test]
    fn a_full_table_refuses_and_ids_that_do_not_fit_are_refused() {
        let mut slots = vec![FREE; 16];
        let mut used = 0;
        for m in 0..14 {
            assert_eq!(
                add(&mut slots, &mut used, &key(1, "k", 0, m), 1, 0),
                Added::New
            );
        }
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "k", 0, 99), 1, 0),
            Added::Full
        );
        // An existing tally still counts.
        assert_eq!(
            add(&mut slots, &mut used, &key(1, "k", 0, 2), 1, 0),
            Added::Existing
        );
        let long = "x".repeat(ID_BYTES + 1);
        let mut empty = vec![FREE; 4];
        assert_eq!(
            add(&mut empty, &mut 0, &key(1, &long, 0, 0), 1, 0),
            Added::Full
        );
    }

    fn tally(id: &str, code: u8, minute: i64, count: i64, cost: i64) -> Tally {
        let mut slots = vec![FREE; 4];
        add(&mut slots, &mut 0, &key(1, id, code, minute), count, cost);
        take(&mut slots, &mut 0, 1)[0]
    }

    #[test]
    fn a_digest_sums_a_minute_over_its_writes_and_counts_its_batches() {
        let mut d = Digests::new(100);
        d.remember(&[
            tally("a", 0, 5, 2, 3),
            tally("b", 1, 5, 1, 0),
            tally("a", 0, 6, 1, 1),
        ]);
        d.remember(&[tally("a", 0, 5, 4, 4)]);
        let five = d.take(5, 2).expect("two batches of minute 5");
        assert_eq!(five.len(), 2);
        assert_eq!(five[&("a".to_owned(), 7, 0)], (6, 7));
        assert_eq!(five[&("b".to_owned(), 7, 1)], (1, 0));
        assert_eq!(d.take(5, 2), None, "taken once");
        assert_eq!(d.entries, 1);
    }

    #[test]
    fn a_digest_is_not_used_when_the_table_holds_other_batches_of_its_minute() {
        let mut d = Digests::new(100);
        d.remember(&[tally("a", 0, 5, 1, 1)]);
        assert_eq!(d.take(5, 2), None, "a batch it did not see");
        assert!(d.is_empty(), "and it is forgotten");
        d.remember(&[tally("a", 0, 5, 1, 1)]);
        d.remember(&[tally("a", 0, 6, 1, 1)]);
        d.forget_before(6);
        assert_eq!(d.take(5, 1), None);
        assert!(d.take(6, 1).is_some());
        assert_eq!(d.entries, 0);
    }

    #[test]
    fn a_digest_over_the_limit_is_given_up_but_counts_stay_right() {
        let mut d = Digests::new(2);
        d.remember(&[tally("a", 0, 5, 1, 1), tally("b", 0, 5, 1, 1)]);
        d.remember(&[tally("a", 0, 5, 1, 1), tally("c", 0, 6, 1, 1)]);
        assert_eq!(d.take(6, 1), None, "no room for c: given up");
        assert_eq!(d.take(5, 2).map(|s| s.len()), Some(2), "a and b fit");
        assert_eq!(d.entries, 0);
        d.remember(&[tally("c", 0, 7, 1, 1)]);
        assert!(d.take(7, 1).is_some(), "room again once taken");
    }

    proptest! {
        #[test]
        fn the_table_counts_what_a_map_counts(
            ops in proptest::collection::vec((1u32..4, 0usize..6, 0u8..3, 0i64..3, 0i64..5, any::<bool>()), 1..300)
        ) {
            let ids = ["a", "b", "", "key_x", "key_y", "z"];
            let mut slots = vec![FREE; 64];
            let mut used = 0;
            let mut model: Model = HashMap::new();
            let mut taken: Model = HashMap::new();
            for (db, id, code, minute, cost, take_now) in ops {
                let k = key(db, ids[id], code, minute);
                if add(&mut slots, &mut used, &k, 1, cost) != Added::Full {
                    let e = model.entry((db, ids[id].to_owned(), 7, code, minute)).or_default();
                    e.0 += 1;
                    e.1 += cost;
                }
                if take_now {
                    for t in take(&mut slots, &mut used, db) {
                        let e = taken.entry((t.db, t.id().to_owned(), t.created_us, t.code, t.minute)).or_default();
                        e.0 += t.count;
                        e.1 += t.cost;
                    }
                }
                prop_assert_eq!(used, slots.iter().filter(|t| t.db != 0).count());
            }
            for db in 1..4 {
                for t in take(&mut slots, &mut used, db) {
                    let e = taken.entry((t.db, t.id().to_owned(), t.created_us, t.code, t.minute)).or_default();
                    e.0 += t.count;
                    e.1 += t.cost;
                }
            }
            prop_assert_eq!(taken, model);
            prop_assert_eq!(used, 0);
        }
    }
}

//! The metering engine's table of keys, as plain memory: open addressing with linear probing
//! and backward-shift deletion (no tombstones, so probe chains stay short however many keys come
//! and go). It lives in shared memory (`engine`), but nothing here knows that: every operation is
//! a pure function of the slice, unit-tested against a `HashMap`.

use crate::metering::Counters;

/// Key ids take at most 128 characters of [A-Za-z0-9_.:-] (keys.rs), so every id fits.
pub const ID_BYTES: usize = 128;
/// The first byte of a window entry's id (`Entry::is_window`).
pub const WINDOW_TAG: u8 = 1;
/// The first byte of an identity's entry id (`engine::identity_entry`): its quota, written to
/// apikeys.identity_meters.
pub const IDENTITY_TAG: u8 = 2;
/// `Option<i64>` in shared memory: this value means None.
const NONE: i64 = i64::MIN;

/// Which key: the database, its id, and when it was created (a key deleted and created again
/// under the same id is another key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRef<'a> {
    pub db: u32,
    pub id: &'a str,
    pub created_us: i64,
}

/// One key's entry. `db == 0` marks a free slot (no database has OID 0).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub db: u32,
    id_len: u8,
    /// The key's limits and counters are loaded (from `apikeys.keys` and `apikeys.meters`).
    pub metered: bool,
    /// In each of the two dirty lists (see `Dirty`: counters, uses), at `queue_pos`.
    queued: [bool; 2],
    /// Writes that found no row of the key to write to (see writer::UNWRITTEN_TRIES).
    pub unwritten: u8,
    /// How much quota was written ahead (see `written_remaining`; at most WRITE_AHEAD_MAX).
    pub ahead: u8,
    queue_pos: [u32; 2],
    id: [u8; ID_BYTES],
    /// Quota spends since the writer last took the counters: the recent demand.
    pub spends: u32,
    pub created_us: i64,
    /// `apikeys.keys.meter_version` the counters belong to: a management change bumps it and
    /// the next verification loads the key again.
    pub version: i64,
    remaining: i64,
    /// When the quota was last refilled and the next refill is due.
    pub next_refill_us: i64,
    pub last_refill_us: i64,
    window_start_us: i64,
    window_count: i64,
    window_previous: i64,
    /// VALID uses not yet written, and the last one.
    pub uses: u64,
    pub last_used_us: i64,
    /// The counters changed at `dirty_seq` (a per-database sequence); written up to
    /// `flushed_seq`.
    pub dirty_seq: u64,
    pub flushed_seq: u64,
    pub last_access_us: i64,
    /// The quota left as `apikeys.meters` holds it, committed, and the meter_version and last
    /// refill it was written at: the writer writes quota ahead (`metering::write_ahead`), so a
    /// spend that leaves at least this much is durable already.
    written_remaining: i64,
    written_version: i64,
    written_refill_us: i64,
    /// The quota left a write in flight (collected, not committed yet) is writing: once it
    /// commits it is what a crash goes back to, so until then a spend must leave at least this
    /// much too to be covered, whichever counters it was collected from.
    pending_remaining: i64,
    /// `apikeys.keys.credits` (update_credits since the quota was last set) that `remaining`
    /// includes: a credit reaches the entry as a new meter_version, and adds what it changed.
    pub credits: i64,
    /// VALID verifications counted for analytics (SPEC §8) in minute `valid_minute` (epoch
    /// minutes) and the cost they spent, taken by the writer with the uses: the verification
    /// finds this entry anyway, so counting here spares it a second random read of shared
    /// memory (the tallies table's).
    pub valid_minute: i64,
    pub valid_count: i64,
    pub valid_cost: i64,
}

pub const FREE: Entry = Entry {
    db: 0,
    id_len: 0,
    metered: false,
    queued: [false; 2],
    unwritten: 0,
    ahead: 0,
    queue_pos: [0; 2],
    id: [0; ID_BYTES],
    spends: 0,
    created_us: 0,
    version: 0,
    remaining: NONE,
    next_refill_us: i64::MAX,
    last_refill_us: NONE,
    window_start_us: NONE,
    window_count: 0,
    window_previous: 0,
    uses: 0,
    last_used_us: 0,
    dirty_seq: 0,
    flushed_seq: 0,
    last_access_us: 0,
    written_remaining: NONE,
    written_version: NONE,
    written_refill_us: NONE,
    pending_remaining: NONE,
    credits: 0,
    valid_minute: 0,
    valid_count: 0,
    valid_cost: 0,
};

fn opt(v: i64) -> Option<i64> {
    (v != NONE).then_some(v)
}

fn raw(v: Option<i64>) -> i64 {
    v.unwrap_or(NONE)
}

impl Entry {
    pub fn id(&self) -> &str {
        std::str::from_utf8(&self.id[..usize::from(self.id_len)]).unwrap_or("")
    }

    fn is(&self, key: &KeyRef<'_>) -> bool {
        self.db == key.db
            && self.created_us == key.created_us
            && &self.id[..usize::from(self.id_len)] == key.id.as_bytes()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            remaining: opt(self.remaining),
            window_start_us: opt(self.window_start_us),
            window_count: self.window_count,
            window_previous: self.window_previous,
        }
    }

    pub fn set_counters(&mut self, c: &Counters) {
        self.remaining = raw(c.remaining);
        self.window_start_us = raw(c.window_start_us);
        self.window_count = c.window_count;
        self.window_previous = c.window_previous;
    }

    /// Whether this entry holds only a rate-limit window (a named or standalone limit, see
    /// `engine::Window`), not a key's counters: such ids start with byte 1, which no key id has.
    pub fn is_window(&self) -> bool {
        self.id_len > 0 && self.id[0] == WINDOW_TAG
    }

    /// For a window entry: until when its counts matter (an eviction before would reopen the
    /// window). Kept in `next_refill_us`, which only a key's quota uses.
    pub fn window_needed_until(&self) -> i64 {
        self.next_refill_us
    }

    pub fn set_window_needed_until(&mut self, until_us: i64) {
        self.next_refill_us = until_us;
    }

    pub fn last_refill(&self) -> Option<i64> {
        opt(self.last_refill_us)
    }

    /// Records what `apikeys.meters` now holds (committed) for this key: `remaining` at
    /// `version` and last refill `last_refill`, written `ahead` of the counters.
    pub fn set_written(
        &mut self,
        remaining: Option<i64>,
        version: i64,
        last_refill: Option<i64>,
        ahead: u8,
    ) {
        self.written_remaining = raw(remaining);
        self.written_version = version;
        self.written_refill_us = raw(last_refill);
        self.ahead = ahead;
    }

    /// Whether what is written is of the counters the entry holds now (the same meter_version
    /// and refill), with a quota.
    fn written_current(&self) -> bool {
        self.written_version == self.version
            && self.written_refill_us == self.last_refill_us
            && self.remaining != NONE
            && self.written_remaining != NONE
    }

    /// Records that a write of `remaining` is in flight (None: none is).
    pub fn set_pending(&mut self, remaining: Option<i64>) {
        self.pending_remaining = raw(remaining);
    }

    /// Moves the write in flight by `delta` (credits the entry took in since it was collected).
    pub fn shift_pending(&mut self, delta: i64) {
        if self.pending_remaining != NONE {
            self.pending_remaining = self.pending_remaining.saturating_add(delta);
        }
    }

    /// Whether a spend that leaves `remaining` (of these counters) is durable already: the quota
    /// written is not more than that, nor is the quota a write in flight is about to commit.
    pub fn covers(&self, remaining: Option<i64>) -> bool {
        self.written_current()
            && remaining.is_some_and(|left| {
                left >= self.written_remaining
                    && (self.pending_remaining == NONE || left >= self.pending_remaining)
            })
    }

    /// How much of what was written ahead no spend has used yet (0 when what is written is of
    /// other counters).
    pub fn unused_ahead(&self) -> i64 {
        if self.written_current() {
            self.remaining.saturating_sub(self.written_remaining).max(0)
        } else {
            0
        }
    }

    /// Whether less than half of what was last written ahead is left unused: the callers then ask
    /// for the next write, and until then the writer leaves the key alone.
    pub fn cover_running_low(&self) -> bool {
        self.unused_ahead() * 2 < i64::from(self.ahead)
    }

    /// Whether everything the entry holds is written, quota written ahead given back too: it can
    /// go without losing anything.
    pub fn clean(&self) -> bool {
        self.uses == 0
            && self.valid_count == 0
            && self.flushed_seq >= self.dirty_seq
            && self.unused_ahead() == 0
            && self.pending_remaining == NONE
    }
}

/// FNV-1a of `bytes`: where an open-addressing table (this one, `tallies`) starts probing.
pub fn fnv1a<'a>(bytes: impl Iterator<Item = &'a u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn home(key: &KeyRef<'_>, capacity: usize) -> usize {
    // Over the database, the id and the creation time.
    let hash = fnv1a(
        key.db
            .to_le_bytes()
            .iter()
            .chain(key.id.as_bytes())
            .chain(&key.created_us.to_le_bytes()),
    );
    (hash % capacity as u64) as usize
}

/// The slot holding `key`, if any.
pub fn find(slots: &[Entry], key: &KeyRef<'_>) -> Option<usize> {
    let n = slots.len();
    if n == 0 {
        return None;
    }
    let start = home(key, n);
    for probe in 0..n {
        let i = (start + probe) % n;
        if slots[i].db == 0 {
            return None;
        }
        if slots[i].is(key) {
            return Some(i);
        }
    }
    None
}

/// The slot of `key`, made (free of counters) when it is new; None when the id does not fit or
/// the table is full. `used` counts the occupied slots.
pub fn find_or_insert(slots: &mut [Entry], used: &mut usize, key: &KeyRef<'_>) -> Option<usize> {
    let bytes = key.id.as_bytes();
    let n = slots.len();
    if key.db == 0 || bytes.is_empty() || bytes.len() > ID_BYTES || n == 0 {
        return None;
    }
    let start = home(key, n);
    for probe in 0..n {
        let i = (start + probe) % n;
        if slots[i].db == 0 {
            // Keep one slot free so that every probe ends.
            if *used + 1 >= n {
                return None;
            }
            let mut e = FREE;
            e.db = key.db;
            e.id_len = bytes.len() as u8;
            e.id[..bytes.len()].copy_from_slice(bytes);
            e.created_us = key.created_us;
            slots[i] = e;
            *used += 1;
            return Some(i);
        }
        if slots[i].is(key) {
            return Some(i);
        }
    }
    None
}

/// Which dirty list: changed counters (written at once: quota spends wait for them) or uses
/// (written every few seconds).
pub const COUNTERS: usize = 0;
pub const USES: usize = 1;

/// The entries with something to write, so that a writer visits those and not the whole table:
/// slot numbers, each entry at most once per list (`Entry::queued`).
pub struct Dirty<'a> {
    pub list: &'a mut [u32],
    pub len: &'a mut usize,
    pub which: usize,
}

impl Dirty<'_> {
    /// Queues slot `i` unless it is queued already.
    pub fn mark(&mut self, slots: &mut [Entry], i: usize) {
        let w = self.which;
        let e = &mut slots[i];
        if e.queued[w] || *self.len >= self.list.len() {
            return;
        }
        e.queued[w] = true;
        e.queue_pos[w] = *self.len as u32;
        self.list[*self.len] = i as u32;
        *self.len += 1;
    }

    /// Takes slot `i` out of the list (the last one takes its place).
    pub fn unmark(&mut self, slots: &mut [Entry], i: usize) {
        let w = self.which;
        if !slots[i].queued[w] {
            return;
        }
        let pos = slots[i].queue_pos[w] as usize;
        let last = *self.len - 1;
        let moved = self.list[last] as usize;
        self.list[pos] = moved as u32;
        slots[moved].queue_pos[w] = pos as u32;
        *self.len = last;
        slots[i].queued[w] = false;
    }

    /// Queued slots, in list order.
    pub fn get(&self, k: usize) -> Option<usize> {
        (k < *self.len).then(|| self.list[k] as usize)
    }
}

/// Empties slot `i`, moving later entries of its probe chain back so that none becomes
/// unreachable (and keeping the dirty lists pointing at them).
pub fn remove(slots: &mut [Entry], used: &mut usize, dirty: &mut [Dirty<'_>; 2], i: usize) {
    let n = slots.len();
    if slots[i].db == 0 {
        return;
    }
    for d in dirty.iter_mut() {
        d.unmark(slots, i);
    }
    let mut hole = i;
    let mut j = i;
    loop {
        j = (j + 1) % n;
        if slots[j].db == 0 {
            break;
        }
        let e = slots[j];
        let key = KeyRef {
            db: e.db,
            id: e.id(),
            created_us: e.created_us,
        };
        let h = home(&key, n);
        // The entry at j may fill the hole if its home is not within (hole, j] cyclically.
        let between = if hole <= j {
            hole < h && h <= j
        } else {
            hole < h || h <= j
        };
        if !between {
            slots[hole] = e;
            for d in dirty.iter_mut() {
                if e.queued[d.which] {
                    d.list[e.queue_pos[d.which] as usize] = hole as u32;
                }
            }
            hole = j;
        }
    }
    slots[hole] = FREE;
    *used -= 1;
}

#[cfg(test)]
mod unit {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_spend_is_covered_only_by_quota_written_for_the_same_counters() {
        let mut e = FREE;
        e.version = 3;
        e.last_refill_us = 100;
        e.set_counters(&Counters {
            remaining: Some(50),
            ..Counters::default()
        });
        assert!(!e.covers(Some(49)), "nothing written yet");
        e.set_written(Some(40), 3, Some(100), 10);
        assert!(e.covers(Some(49)) && e.covers(Some(40)));
        assert!(!e.covers(Some(39)), "below what is written: must wait");
        assert!(!e.covers(None));
        assert_eq!(e.unused_ahead(), 10);
        assert!(!e.cover_running_low(), "all 10 written ahead are unused");
        e.set_written(Some(40), 3, Some(100), 21);
        assert!(e.cover_running_low(), "10 of 21 left: less than half");
        e.set_written(Some(40), 3, Some(100), 10);
        assert!(
            !e.clean(),
            "quota written ahead must be given back before the entry goes"
        );
        e.version = 4;
        assert!(!e.covers(Some(49)), "another meter_version");
        assert_eq!(e.unused_ahead(), 0);
        e.version = 3;
        e.last_refill_us = 200;
        assert!(!e.covers(Some(49)), "refilled since");
        e.last_refill_us = 100;
        e.set_written(Some(50), 3, Some(100), 0);
        assert_eq!(e.unused_ahead(), 0);
        assert!(e.clean());
        e.set_written(Some(40), 3, None, 10);
        assert!(!e.covers(Some(45)), "written before the refill");
        // A write in flight will commit 45: until it does, only spends leaving 45 are covered.
        e.set_written(Some(40), 3, Some(100), 10);
        e.set_pending(Some(45));
        assert!(!e.covers(Some(44)) && e.covers(Some(45)));
        e.set_pending(None);
        assert!(e.covers(Some(44)));
    }

    #[test]
    fn entries_are_found_by_database_id_and_creation() {
        let mut slots = vec![FREE; 64];
        let mut used = 0;
        let a = KeyRef {
            db: 1,
            id: "a",
            created_us: 10,
        };
        let i = find_or_insert(&mut slots, &mut used, &a).unwrap();
        slots[i].uses = 3;
        assert_eq!(find(&slots, &a), Some(i));
        assert_eq!(find_or_insert(&mut slots, &mut used, &a), Some(i));
        assert_eq!(find(&slots, &KeyRef { db: 2, ..a }), None);
        assert_eq!(
            find(
                &slots,
                &KeyRef {
                    created_us: 11,
                    ..a
                }
            ),
            None
        );
        assert_eq!(find(&slots, &KeyRef { id: "b", ..a }), None);
        assert_eq!(used, 1);
        let long = "x".repeat(ID_BYTES + 1);
        assert_eq!(
            find_or_insert(&mut slots, &mut used, &KeyRef { id: &long, ..a }),
            None
        );
        assert_eq!(
            find_or_insert(&mut slots, &mut used, &KeyRef { id: "", ..a }),
            None
        );
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_finds_known_ones() {
        let mut slots = vec![FREE; 16];
        let mut used = 0;
        let names: Vec<String> = (0..15).map(|i| format!("k{i}")).collect();
        for name in &names {
            assert!(find_or_insert(
                &mut slots,
                &mut used,
                &KeyRef {
                    db: 1,
                    id: name,
                    created_us: 0
                }
            )
            .is_some());
        }
        assert_eq!(used, 15);
        assert_eq!(
            find_or_insert(
                &mut slots,
                &mut used,
                &KeyRef {
                    db: 1,
                    id: "new",
                    created_us: 0
                }
            ),
            None
        );
        for name in &names {
            assert!(find(
                &slots,
                &KeyRef {
                    db: 1,
                    id: name,
                    created_us: 0
                }
            )
            .is_some());
        }
    }

    /// Random inserts and removals against a HashMap: every key present is found, every key
    /// removed is gone, whatever the probe chains looked like.
    #[test]
    fn inserts_and_removals_agree_with_a_hash_map() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let ids: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
        let mut slots = vec![FREE; 128];
        let mut used = 0;
        let (mut list0, mut list1) = (vec![0u32; 128], vec![0u32; 128]);
        let (mut len0, mut len1) = (0usize, 0usize);
        let mut model: HashMap<(u32, usize), u64> = HashMap::new();
        for step in 0..20_000u64 {
            let db = 1 + next(2) as u32;
            let k = next(ids.len() as u64) as usize;
            let key = KeyRef {
                db,
                id: &ids[k],
                created_us: 7,
            };
            let mut dirty = [
                Dirty {
                    list: &mut list0,
                    len: &mut len0,
                    which: COUNTERS,
                },
                Dirty {
                    list: &mut list1,
                    len: &mut len1,
                    which: USES,
                },
            ];
            if next(3) == 0 {
                if let Some(i) = find(&slots, &key) {
                    remove(&mut slots, &mut used, &mut dirty, i);
                }
                model.remove(&(db, k));
            } else if let Some(i) = find_or_insert(&mut slots, &mut used, &key) {
                slots[i].uses = step;
                // Every other entry is queued, as a verification would queue it.
                if step % 2 == 0 {
                    dirty[COUNTERS].mark(&mut slots, i);
                }
                if step % 3 == 0 {
                    dirty[USES].mark(&mut slots, i);
                }
                model.insert((db, k), step);
            } else {
                assert!(used + 1 >= slots.len(), "refused while not full");
            }
            assert_eq!(used, model.len());
            // Each dirty list names exactly its queued entries, each where it says it is.
            for (w, list, len) in [(COUNTERS, &list0, len0), (USES, &list1, len1)] {
                let queued: Vec<usize> = (0..slots.len())
                    .filter(|&i| slots[i].db != 0 && slots[i].queued[w])
                    .collect();
                assert_eq!(len, queued.len());
                for &i in &queued {
                    assert_eq!(list[slots[i].queue_pos[w] as usize] as usize, i);
                }
            }
        }
        for ((db, k), step) in &model {
            let i = find(
                &slots,
                &KeyRef {
                    db: *db,
                    id: &ids[*k],
                    created_us: 7,
                },
            )
            .expect("present");
            assert_eq!(slots[i].uses, *step);
        }
    }

    #[test]
    fn a_credit_moves_a_write_in_flight_and_nothing_else() {
        let mut e = FREE;
        e.shift_pending(5);
        assert_eq!(e.pending_remaining, NONE);
        e.set_pending(Some(10));
        e.shift_pending(-3);
        assert_eq!(e.pending_remaining, 7);
    }

    #[test]
    fn an_entry_and_its_list_places_take_at_most_328_bytes() {
        // apikeys.shared_keys' description and README quote it.
        assert!(
            std::mem::size_of::<Entry>() + 8 <= 328,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn the_dirty_list_queues_each_entry_once() {
        let mut slots = vec![FREE; 8];
        let mut list = vec![0u32; 8];
        let mut len = 0;
        let mut used = 0;
        let a = find_or_insert(
            &mut slots,
            &mut used,
            &KeyRef {
                db: 1,
                id: "a",
                created_us: 0,
            },
        )
        .unwrap();
        let b = find_or_insert(
            &mut slots,
            &mut used,
            &KeyRef {
                db: 1,
                id: "b",
                created_us: 0,
            },
        )
        .unwrap();
        let mut dirty = Dirty {
            list: &mut list,
            len: &mut len,
            which: USES,
        };
        dirty.mark(&mut slots, a);
        dirty.mark(&mut slots, b);
        dirty.mark(&mut slots, a);
        assert_eq!(
            (dirty.get(0), dirty.get(1), dirty.get(2)),
            (Some(a), Some(b), None)
        );
        dirty.unmark(&mut slots, a);
        assert_eq!((dirty.get(0), dirty.get(1)), (Some(b), None));
        dirty.unmark(&mut slots, a);
        assert_eq!(*dirty.len, 1);
    }

    #[test]
    fn counters_round_trip_through_an_entry() {
        let mut e = FREE;
        assert_eq!(e.counters(), Counters::default());
        let c = Counters {
            remaining: Some(5),
            window_start_us: Some(-3),
            window_count: 2,
            window_previous: 9,
        };
        e.set_counters(&c);
        assert_eq!(e.counters(), c);
        assert!(e.clean());
        e.dirty_seq = 1;
        assert!(!e.clean());
    }
}

//! A hash map in parts, for the large tables: the stages' event ids and rows, and the
//! embedded store's rows.
//!
//! One `HashMap` grows by doubling all at once: for a moment it holds its old array
//! beside a new one twice the size, and every page of the new one is faulted in fresh.
//! At 10M events the voids stage's table alone doubles from 2^23 to 2^24 buckets of 49
//! bytes: from about 400 MB to 800 MB.
//! Split into [`PARTS`] maps chosen by bits of the key (the keys are digests already,
//! so the bits are uniform), each part doubles on its own: what is held twice is one
//! part's array, and the array a part frees is there for the next part to grow into
//! (measured in benches/README, session 14).

pub(crate) use hashbrown::hash_map::Entry;
use hashbrown::{Equivalent, HashMap};
use std::hash::Hash;

/// Bits of the key that choose the part.
const PART_BITS: u32 = 8;
pub(crate) const PARTS: usize = 1 << PART_BITS;

/// A key that carries uniform bits of its own: the part is read off its top bits (the
/// routes between workers read other bits, so a worker's keys still fill every part).
pub(crate) trait PartKey {
    fn part(&self) -> usize;
}

/// Row ids: an xxh3-128 digest; rows route by the low 64 bits.
impl PartKey for u128 {
    fn part(&self) -> usize {
        (*self >> (128 - PART_BITS)) as usize
    }
}

/// Event id digests (xxh3-128); events route by another hash of the id.
impl PartKey for [u64; 2] {
    fn part(&self) -> usize {
        (self[1] >> (64 - PART_BITS)) as usize
    }
}

/// Seeds of the hash the embedded store's rows are parted by.
const PARTING: ahash::RandomState = ahash::RandomState::with_seeds(
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
);

/// The embedded store's rows: their key is no digest, so the part comes from a hash
/// of it with fixed seeds (independent of the parts' own randomly seeded hasher, whose
/// top bits must still vary within a part).
impl PartKey for (crate::dataflow::RowKey, u32) {
    fn part(&self) -> usize {
        (PARTING.hash_one(self) >> (64 - PART_BITS)) as usize
    }
}

/// A store row's key and rank, borrowed: finds a row without an owned copy of its key
/// (the store changes rows that exist far more often than it adds rows).
#[derive(Clone, Copy)]
pub(crate) struct RowRef<'a>(pub &'a crate::dataflow::RowKey, pub u32);

/// Hashes as the owned `(RowKey, u32)` does (a tuple hashes its fields in order).
impl Hash for RowRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
        self.1.hash(state);
    }
}

impl Equivalent<(crate::dataflow::RowKey, u32)> for RowRef<'_> {
    fn equivalent(&self, key: &(crate::dataflow::RowKey, u32)) -> bool {
        *self.0 == key.0 && self.1 == key.1
    }
}

impl PartKey for RowRef<'_> {
    fn part(&self) -> usize {
        (PARTING.hash_one(self) >> (64 - PART_BITS)) as usize
    }
}

/// A `HashMap` in [`PARTS`] parts, with the few calls the stages and the store make.
pub(crate) struct Parted<K, V> {
    parts: Box<[HashMap<K, V, ahash::RandomState>]>,
}

impl<K, V> Default for Parted<K, V> {
    fn default() -> Self {
        let hasher = ahash::RandomState::new();
        Parted {
            parts: (0..PARTS)
                .map(|_| HashMap::with_hasher(hasher.clone()))
                .collect(),
        }
    }
}

impl<K: PartKey + Hash + Eq, V> Parted<K, V> {
    fn part_mut(&mut self, k: &K) -> &mut HashMap<K, V, ahash::RandomState> {
        &mut self.parts[k.part()]
    }

    pub fn entry(&mut self, k: K) -> Entry<'_, K, V, ahash::RandomState> {
        self.part_mut(&k).entry(k)
    }

    /// The value under `k`, or under the key `k` stands for (a borrowed form: see
    /// [`Equivalent`]; it must hash as that key does and choose the same part).
    pub fn get<Q: PartKey + Hash + Equivalent<K> + ?Sized>(&self, k: &Q) -> Option<&V> {
        self.parts[k.part()].get(k)
    }

    /// Like [`Parted::get`], to change the value in place.
    pub fn get_mut<Q: PartKey + Hash + Equivalent<K> + ?Sized>(&mut self, k: &Q) -> Option<&mut V> {
        self.parts[k.part()].get_mut(k)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.part_mut(&k).insert(k, v)
    }

    pub fn remove<Q: PartKey + Hash + Equivalent<K> + ?Sized>(&mut self, k: &Q) -> Option<V> {
        self.parts[k.part()].remove(k)
    }

    /// Entries in all parts (a sum over [`PARTS`] lengths).
    pub fn len(&self) -> usize {
        self.parts.iter().map(HashMap::len).sum()
    }

    /// Every entry, part after part, in no particular order; its length is known
    /// (serializers that write the length first need it, and `collect` sizes by it).
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            entries: self.parts.iter().flat_map(HashMap::iter),
            left: self.len(),
        }
    }
}

type PartsIter<'a, K, V> = std::iter::FlatMap<
    std::slice::Iter<'a, HashMap<K, V, ahash::RandomState>>,
    hashbrown::hash_map::Iter<'a, K, V>,
    fn(&'a HashMap<K, V, ahash::RandomState>) -> hashbrown::hash_map::Iter<'a, K, V>,
>;

/// [`Parted::iter`]: the parts' entries chained, with their count.
pub(crate) struct Iter<'a, K, V> {
    entries: PartsIter<'a, K, V>,
    left: usize,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.entries.next();
        self.left -= usize::from(next.is_some());
        next
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<K, V> ExactSizeIterator for Iter<'_, K, V> {}

impl<K: PartKey + Hash + Eq, V> FromIterator<(K, V)> for Parted<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut t = Parted::default();
        for (k, v) in entries {
            t.insert(k, v);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_find_their_part_and_every_part_is_used() {
        let mut t: Parted<[u64; 2], u32> = Parted::default();
        for i in 0..20_000u32 {
            assert_eq!(
                t.insert(crate::dataflow::id_digest(&format!("e{i}")), i),
                None
            );
        }
        assert_eq!(t.len(), 20_000);
        assert!(
            t.parts.iter().all(|p| !p.is_empty()),
            "a part was never used"
        );
        assert_eq!(t.get(&crate::dataflow::id_digest("e7")), Some(&7));
        *t.get_mut(&crate::dataflow::id_digest("e8")).unwrap() += 1;
        assert_eq!(t.remove(&crate::dataflow::id_digest("e8")), Some(9));
        assert_eq!(t.get(&crate::dataflow::id_digest("e8")), None);
        match t.entry(crate::dataflow::id_digest("e9")) {
            Entry::Occupied(o) => assert_eq!(*o.get(), 9),
            Entry::Vacant(_) => panic!("e9 is held"),
        }
        assert_eq!(t.len(), 19_999);
    }

    #[test]
    fn store_keys_spread_over_the_parts_and_iterate_whole() {
        use crate::dataflow::RowKey;
        use crate::model::window::WindowSize;
        let key = |i: u32| {
            (
                RowKey {
                    view: 0,
                    size: WindowSize::Fixed(60_000),
                    start: i64::from(i) * 60_000,
                    group: vec!["p1".into(), "USD".into()],
                },
                0u32,
            )
        };
        let t: Parted<(RowKey, u32), u32> = (0..20_000).map(|i| (key(i), i)).collect();
        assert_eq!(t.len(), 20_000);
        assert!(
            t.parts.iter().all(|p| !p.is_empty()),
            "a part was never used"
        );
        assert_eq!(t.get(&key(123)), Some(&123));
        // Borrowed keys find the same rows.
        for i in [0, 123, 19_999] {
            let (k, rank) = key(i);
            assert_eq!(RowRef(&k, rank).part(), key(i).part());
            assert_eq!(t.get(&RowRef(&k, rank)), Some(&i));
            assert_eq!(t.get(&RowRef(&k, 1)), None);
        }
        assert_eq!(t.iter().len(), 20_000);
        let mut seen: Vec<u32> = t.iter().map(|(_, v)| *v).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn row_ids_use_their_top_bits() {
        assert_eq!((u128::MAX).part(), PARTS - 1);
        assert_eq!((1u128 << 120).part(), 1);
        assert_eq!(u128::from(u64::MAX).part(), 0);
    }
}

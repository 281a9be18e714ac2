//! Kafka's default partitioner for keyed records, so a key lands in the same
//! partition number here as it would in a Kafka topic of the same size.
//!
//! `partition = toPositive(murmur2(key bytes)) % partitions`, where
//! `toPositive` masks the sign bit (it is not `abs`).

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let mut h = SEED ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Kafka's `Utils.toPositive`: clears the sign bit.
pub fn to_positive(n: u32) -> u32 {
    n & 0x7fff_ffff
}

/// The partition Kafka's producer would choose for `key` in a topic with
/// `partitions` partitions. The key's bytes are its UTF-8 encoding, as with
/// Kafka's `StringSerializer`.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    to_positive(murmur2(key.as_bytes())) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka `UtilsTest.testMurmur2` (Java ints).
    #[test]
    fn kafka_utils_test_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                *expected,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// librdkafka `src/rdmurmur2.c` `unittest_murmur2`.
    #[test]
    fn librdkafka_unit_test_vectors() {
        let short_unaligned = b"1234";
        let unaligned = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: &[(&[u8], u32)] = &[
            (b"kafka", 0xd067cf64),
            (b"giberish123456789", 0x8f552b0c),
            (short_unaligned, 0x9fc97b14),
            (&short_unaligned[1..], 0xe7c009ca),
            (&short_unaligned[2..], 0x873930da),
            (&short_unaligned[3..], 0x5a4b5ca1),
            (unaligned, 0x78424f1c),
            (&unaligned[1..], 0x4a62b377),
            (&unaligned[2..], 0xe0e4e09e),
            (&unaligned[3..], 0x62b8b43f),
            (b"", 0x106e08d9),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                *expected,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// librdkafka `tests/0048-partitioner.c` with 17 partitions (the NULL key
    /// is never hashed by Kafka, so only the non-null keys are checked).
    #[test]
    fn librdkafka_partitioner_vectors() {
        let cases = [
            ("", 11),
            ("23456", 9),
            ("this is another string with more length to it perhaps", 11),
            ("hejsan", 5),
        ];
        for (key, expected) in cases {
            assert_eq!(partition_for_key(key, 17), expected, "key {key:?}");
        }
        assert_eq!(to_positive(0x058d780f) % 17, 9);
    }

    /// kafka-python `test_murmur2_java_compatibility`, 1000 partitions.
    #[test]
    fn kafka_python_java_compatibility_vectors() {
        let cases: &[(&[u8], u32)] = &[
            (b"", 681),
            (b"a", 524),
            (b"ab", 434),
            (b"abc", 107),
            (b"123456789", 566),
            (b"\x00 ", 742),
        ];
        for (input, expected) in cases {
            assert_eq!(
                to_positive(murmur2(input)) % 1000,
                *expected,
                "key {input:?}"
            );
        }
    }

    #[test]
    fn to_positive_masks_instead_of_abs() {
        assert_eq!(to_positive(0x8000_0000), 0);
        assert_eq!(to_positive(0xffff_ffff), 0x7fff_ffff);
    }
}

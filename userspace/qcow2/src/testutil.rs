//! Reading what qemu's tools say of an image, for the tests of this crate
//! and of the command line (feature `testutil`).

/// One extent of `qemu-img map --output=json`: its guest offset, length,
/// and whether qemu calls it compressed.
pub type MapExtent = (u64, u64, bool);

/// The extents of a `qemu-img map --output=json` listing (a qemu that
/// reports `"compressed"`: 8.2 and later).
pub fn parse_map(json: &str) -> Vec<MapExtent> {
    let number = |line: &str, key: &str| -> u64 {
        let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
        line[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("no number after {key} in {line}"))
    };
    json.lines()
        .filter(|line| line.contains("\"start\""))
        .map(|line| {
            assert!(line.contains("\"compressed\""), "qemu-img map: {line}");
            (
                number(line, "\"start\":"),
                number(line, "\"length\":"),
                line.contains("\"compressed\": true"),
            )
        })
        .collect()
}

/// Whether qemu calls every byte of `start..start + len` compressed
/// (`Some(true)`), none of them (`Some(false)`), or some (`None`).
pub fn compressed_in(map: &[MapExtent], start: u64, len: u64) -> Option<bool> {
    let mut seen = None;
    for &(at, length, compressed) in map {
        if at < start + len && start < at + length {
            match seen {
                None => seen = Some(compressed),
                Some(c) if c != compressed => return None,
                Some(_) => {}
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_listing_and_judges_ranges() {
        let json = r#"[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true},
{ "start": 131072, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680}]"#;
        let map = parse_map(json);
        assert_eq!(map, [(0, 131072, true), (131072, 65536, false)]);
        assert_eq!(compressed_in(&map, 0, 65536), Some(true));
        assert_eq!(compressed_in(&map, 131072, 4096), Some(false));
        assert_eq!(compressed_in(&map, 65536, 131072), None);
        assert_eq!(
            compressed_in(&map, 1 << 20, 4096),
            None,
            "outside every extent"
        );
    }
}

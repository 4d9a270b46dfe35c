//! Pages of the `List*` calls: every answer is bounded in items and in bytes, so a listing
//! of any size crosses the 4 MiB message limit page by page (docs/design/controlapi.md).
//!
//! A page token is the sort key of the last item of the page before (a name, a task id, a
//! node's hostname and id): the next page starts after it in the listing's order, so an
//! object made or removed between two calls neither shifts nor repeats the others.

use prost::Message;
use tonic::Status;

/// Items per page when the caller names no page size (an old caller, which reads one page).
pub const DEFAULT_PAGE_SIZE: usize = 1_000;
/// Most items per page, whatever the caller asks for.
pub const MAX_PAGE_SIZE: usize = 10_000;
/// Encoded bytes of a page's items at most (a page always holds its first item).
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;
/// What an item adds to an answer beyond its own encoding: its field tag and length.
const ITEM_OVERHEAD: usize = 8;

// A page and the rest of its answer (a token, a largest item beyond the budget: one service
// summary is two specs of at most 256 KiB) stay under the message limit.
const _: () = assert!(2 * PAGE_BYTES <= super::MAX_CONTROL_MESSAGE_BYTES);
const _: () = assert!(
    2 * super::validate::MAX_SERVICE_SPEC_BYTES + 64 * 1024 <= PAGE_BYTES,
    "a largest item fits a page"
);

/// The page size a request's `page_size` stands for.
pub fn page_size(asked: u32) -> usize {
    match asked {
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    }
}

/// One page from `items`, which are in the listing's order and start after the caller's token:
/// at most `page_size(asked)` items and [`PAGE_BYTES`] (the first item always). Returns the page
/// and the next page's token — `key` of its last item when more items follow, else empty.
pub fn page<T: Message>(
    items: impl Iterator<Item = Result<T, Status>>,
    asked: u32,
    key: impl Fn(&T) -> String,
) -> Result<(Vec<T>, String), Status> {
    let limit = page_size(asked);
    let mut out: Vec<T> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let item = item?;
        let b = item.encoded_len() + ITEM_OVERHEAD;
        if let Some(last) = out.last() {
            if out.len() >= limit || bytes + b > PAGE_BYTES {
                let next = key(last);
                return Ok((out, next));
            }
        }
        bytes += b;
        out.push(item);
    }
    Ok((out, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::v1 as pb;

    fn nets(n: usize, label_bytes: usize) -> Vec<pb::Network> {
        (0..n)
            .map(|i| pb::Network {
                spec: Some(pb::NetworkSpec {
                    name: format!("n{i:05}"),
                    labels: [("x".to_string(), "y".repeat(label_bytes))].into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect()
    }

    fn name(n: &pb::Network) -> String {
        n.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
    }

    #[test]
    fn pages_are_bounded_in_items_and_bytes_and_end_with_an_empty_token() {
        let all = nets(2_500, 10);
        let (p, next) = page(all.clone().into_iter().map(Ok), 0, name).unwrap();
        assert_eq!(p.len(), DEFAULT_PAGE_SIZE);
        assert_eq!(next, name(&p[p.len() - 1]));
        let (p, next) = page(all.clone().into_iter().map(Ok), 7, name).unwrap();
        assert_eq!((p.len(), next.as_str()), (7, "n00006"));
        let (p, _) = page(all.clone().into_iter().map(Ok), u32::MAX, name).unwrap();
        assert_eq!(p.len(), 2_500.min(MAX_PAGE_SIZE));
        // Exactly the rest: no token, no empty page after it.
        let (p, next) = page(all[..7].iter().cloned().map(Ok), 7, name).unwrap();
        assert_eq!((p.len(), next.as_str()), (7, ""));

        let big = nets(100, 60 * 1024);
        let (p, next) = page(big.into_iter().map(Ok), 0, name).unwrap();
        let bytes: usize = p.iter().map(|n| n.encoded_len()).sum();
        assert!(
            bytes <= PAGE_BYTES && p.len() < 100 && !next.is_empty(),
            "{}",
            p.len()
        );
        // One item over the budget still makes a page.
        let huge = nets(2, PAGE_BYTES);
        let (p, next) = page(huge.into_iter().map(Ok), 0, name).unwrap();
        assert_eq!((p.len(), next.as_str()), (1, "n00000"));
    }
}

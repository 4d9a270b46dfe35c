//! The spread strategy as a tree of heaps: one level per `spread=node.labels.KEY` preference
//! (balance the service's tasks across the label's values first), nodes at the leaves (fewest
//! tasks of the service, then fewest tasks overall, then node order).
//!
//! Picking a node costs O(depth × log nodes); a node (or a whole label value) that no longer
//! fits is dropped for the rest of the round, which is sound because within one group of
//! identical tasks reservations only grow.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// Nodes of one label value, or the nodes themselves at the last level.
pub enum Tree {
    /// Nodes keyed by (tasks of the service, tasks overall, node index).
    Leaf(BinaryHeap<Reverse<(u64, u64, usize)>>),
    /// Children keyed by (tasks of the service under them, child index).
    Branch(BinaryHeap<Reverse<(u64, usize)>>, Vec<Tree>),
}

impl Tree {
    /// Builds the tree over `nodes`; `levels[d][i]` is node `i`'s value of preference `d`
    /// (empty when the node lacks the label: such nodes form a value of their own), `key(i)`
    /// its (tasks of the service, tasks overall). Also returns the service's task total.
    pub fn build(
        nodes: &[usize],
        levels: &[Vec<&str>],
        key: &dyn Fn(usize) -> (u64, u64),
    ) -> (Tree, u64) {
        match levels.split_first() {
            None => {
                let mut total = 0;
                let heap = nodes
                    .iter()
                    .map(|&i| {
                        let (s, t) = key(i);
                        total += s;
                        Reverse((s, t, i))
                    })
                    .collect();
                (Tree::Leaf(heap), total)
            }
            Some((values, rest)) => {
                let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for &i in nodes {
                    groups.entry(values[i]).or_default().push(i);
                }
                let mut heap = BinaryHeap::with_capacity(groups.len());
                let mut children = Vec::with_capacity(groups.len());
                let mut total = 0;
                for members in groups.values() {
                    let (child, sum) = Tree::build(members, rest, key);
                    heap.push(Reverse((sum, children.len())));
                    children.push(child);
                    total += sum;
                }
                (Tree::Branch(heap, children), total)
            }
        }
    }

    /// Picks the best node for which `fits` holds and counts one more task of the service on
    /// it; `None` when no node fits.
    pub fn pick(&mut self, fits: &dyn Fn(usize) -> bool) -> Option<usize> {
        match self {
            Tree::Leaf(heap) => {
                while let Some(Reverse((s, t, i))) = heap.pop() {
                    if fits(i) {
                        heap.push(Reverse((s + 1, t + 1, i)));
                        return Some(i);
                    }
                }
                None
            }
            Tree::Branch(heap, children) => {
                while let Some(Reverse((s, c))) = heap.pop() {
                    if let Some(i) = children[c].pick(fits) {
                        heap.push(Reverse((s + 1, c)));
                        return Some(i);
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balances_label_values_before_nodes() {
        // zone a: nodes 0, 1, 2; zone b: node 3. The service already has one task on node 0.
        let zones = vec!["a", "a", "a", "b"];
        let key = |i: usize| if i == 0 { (1, 1) } else { (0, 0) };
        let (mut tree, total) = Tree::build(&[0, 1, 2, 3], &[zones], &key);
        assert_eq!(total, 1);
        let picks: Vec<usize> = (0..5).map(|_| tree.pick(&|_| true).unwrap()).collect();
        // b (0 tasks) first, then a and b alternate by their totals; inside a, the emptiest.
        assert_eq!(picks, vec![3, 1, 3, 2, 3]);
    }

    #[test]
    fn drops_nodes_that_do_not_fit() {
        let key = |_: usize| (0, 0);
        let (mut tree, _) = Tree::build(&[0, 1, 2], &[], &key);
        assert_eq!(tree.pick(&|i| i != 0), Some(1));
        assert_eq!(tree.pick(&|i| i != 0), Some(2));
        assert_eq!(tree.pick(&|_| false), None);
        assert_eq!(tree.pick(&|_| true), None);
    }
}

//! Min-cost flow by successive shortest paths with potentials (Dijkstra), over
//! lexicographic cost vectors. It stops when the cheapest path no longer lowers the
//! cost, so it finds the cheapest flow of any amount up to the limit.
//!
//! Residual arcs with the same tail and head form one link, kept cheapest first.
//! Between the same two nodes the reduced costs differ from the costs by the same
//! potentials, so only a link's cheapest arc with room can lie on a shortest path:
//! Dijkstra looks at that one arc per link. The pools of one zone all run from the
//! zone's node to the same sink node, so a search costs the groups, not the pools.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::problem::K;

pub(crate) type Cost = [i64; K];

pub(crate) const ZERO: Cost = [0; K];

fn add(a: &Cost, b: &Cost) -> Cost {
    std::array::from_fn(|i| a[i] + b[i])
}

fn sub(a: &Cost, b: &Cost) -> Cost {
    std::array::from_fn(|i| a[i] - b[i])
}

/// The residual arcs from one node to one other: the positions of `order` from
/// where the previous link ends up to `end`.
struct Link {
    head: usize,
    end: usize,
    /// The position of the cheapest arc with room (`end` when none has). Moves back
    /// when an arc before it gets room, and on past arcs without room when its own
    /// arc fills up.
    first: usize,
}

/// A flow network whose arcs always point from a lower to a higher node id, so the
/// first potentials come from one pass in id order.
#[derive(Default)]
pub(crate) struct Graph {
    nodes: usize,
    to: Vec<usize>,
    cap: Vec<i64>,
    original: Vec<i64>,
    cost: Vec<Cost>,
    /// Arc ids by tail, head, cost and id, once the flow starts.
    order: Vec<usize>,
    links: Vec<Link>,
    /// Each node's links: positions `start..end` of `links`.
    out: Vec<(usize, usize)>,
    /// Each arc's link and its position in `order`.
    place: Vec<(usize, usize)>,
}

impl Graph {
    pub fn node(&mut self) -> usize {
        self.nodes += 1;
        self.nodes - 1
    }

    /// Adds an arc and returns its id; arcs of no capacity are not added.
    pub fn arc(&mut self, from: usize, to: usize, cap: i64, cost: Cost) -> Option<usize> {
        debug_assert!(from < to, "arcs point forward");
        if cap <= 0 {
            return None;
        }
        let id = self.to.len();
        for (head, c, k) in [(to, cap, cost), (from, 0, sub(&ZERO, &cost))] {
            self.to.push(head);
            self.cap.push(c);
            self.original.push(c);
            self.cost.push(k);
        }
        Some(id)
    }

    /// Flow sent along arc `id`.
    pub fn flow(&self, id: usize) -> i64 {
        self.original[id] - self.cap[id]
    }

    fn tail(&self, e: usize) -> usize {
        self.to[e ^ 1]
    }

    /// Groups the arcs into links, each cheapest first (ties by arc id).
    fn seal(&mut self) {
        let mut order: Vec<usize> = (0..self.to.len()).collect();
        order.sort_unstable_by_key(|&e| (self.tail(e), self.to[e], self.cost[e], e));
        self.links.clear();
        self.out = vec![(0, 0); self.nodes];
        self.place = vec![(0, 0); self.to.len()];
        let mut i = 0;
        while i < order.len() {
            let (u, v) = (self.tail(order[i]), self.to[order[i]]);
            let mut j = i;
            while j < order.len() && self.tail(order[j]) == u && self.to[order[j]] == v {
                self.place[order[j]] = (self.links.len(), j);
                j += 1;
            }
            if i == 0 || self.tail(order[i - 1]) != u {
                self.out[u] = (self.links.len(), self.links.len());
            }
            self.links.push(Link {
                head: v,
                end: j,
                first: (i..j).find(|&p| self.cap[order[p]] > 0).unwrap_or(j),
            });
            self.out[u].1 = self.links.len();
            i = j;
        }
        self.order = order;
    }

    /// The cheapest arc of `link` with room.
    fn cheapest(&self, link: usize) -> Option<usize> {
        let link = &self.links[link];
        (link.first < link.end).then(|| self.order[link.first])
    }

    fn change(&mut self, e: usize, by: i64) {
        let before = self.cap[e];
        self.cap[e] += by;
        let (l, pos) = self.place[e];
        let link = &mut self.links[l];
        if before == 0 && self.cap[e] > 0 && pos < link.first {
            link.first = pos;
        } else if before > 0 && self.cap[e] == 0 && pos == link.first {
            link.first = (pos + 1..link.end)
                .find(|&p| self.cap[self.order[p]] > 0)
                .unwrap_or(link.end);
        }
    }

    /// Sends up to `limit` units from `s` to `t` at least cost; returns the amount.
    pub fn min_cost_flow(&mut self, s: usize, t: usize, limit: i64) -> i64 {
        self.seal();
        let n = self.nodes;
        let mut potential = self.first_potentials(s);
        let mut dist: Vec<Option<Cost>> = vec![None; n];
        let mut done = vec![false; n];
        let mut via = vec![usize::MAX; n];
        let mut heap = BinaryHeap::new();
        let mut sent = 0;
        while sent < limit {
            dist.iter_mut().for_each(|d| *d = None);
            done.iter_mut().for_each(|d| *d = false);
            dist[s] = Some(ZERO);
            heap.clear();
            heap.push(Reverse((ZERO, s)));
            while let Some(Reverse((d, u))) = heap.pop() {
                if done[u] {
                    continue;
                }
                done[u] = true;
                if u == t {
                    break;
                }
                for link in self.out[u].0..self.out[u].1 {
                    let v = self.links[link].head;
                    if done[v] {
                        continue;
                    }
                    let Some(e) = self.cheapest(link) else {
                        continue;
                    };
                    let reduced = sub(&add(&self.cost[e], &potential[u]), &potential[v]);
                    let nd = add(&d, &reduced);
                    if dist[v].is_none_or(|old| nd < old) {
                        dist[v] = Some(nd);
                        via[v] = e;
                        heap.push(Reverse((nd, v)));
                    }
                }
            }
            let Some(to_t) = dist[t].filter(|_| done[t]) else {
                break;
            };
            // The path's true cost; a path that costs nothing or more makes nothing better.
            if add(&to_t, &sub(&potential[t], &potential[s])) >= ZERO {
                break;
            }
            for v in 0..n {
                let d = match dist[v] {
                    Some(d) if done[v] => d,
                    _ => to_t,
                };
                potential[v] = add(&potential[v], &d);
            }
            let mut push = limit - sent;
            let mut v = t;
            while v != s {
                let e = via[v];
                push = push.min(self.cap[e]);
                v = self.to[e ^ 1];
            }
            let mut v = t;
            while v != s {
                let e = via[v];
                self.change(e, -push);
                self.change(e ^ 1, push);
                v = self.to[e ^ 1];
            }
            sent += push;
        }
        sent
    }

    /// Shortest distances from `s` on the untouched network (a DAG in id order).
    fn first_potentials(&self, s: usize) -> Vec<Cost> {
        let n = self.nodes;
        let mut dist: Vec<Option<Cost>> = vec![None; n];
        dist[s] = Some(ZERO);
        for u in 0..n {
            let Some(du) = dist[u] else { continue };
            for link in self.out[u].0..self.out[u].1 {
                let Some(e) = self.cheapest(link) else {
                    continue;
                };
                let v = self.to[e];
                let nd = add(&du, &self.cost[e]);
                if dist[v].is_none_or(|old| nd < old) {
                    dist[v] = Some(nd);
                }
            }
        }
        dist.into_iter().map(|d| d.unwrap_or(ZERO)).collect()
    }
}

//! The order of a rollout: the canary hosts first, then the rest in batches of a fixed size.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The size of a batch after the canary: a number of hosts, or a share of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    /// This many hosts per batch (at least 1).
    Hosts(usize),
    /// This percentage of all hosts, rounded up (1 to 100).
    Percent(u8),
}

impl Default for BatchSize {
    /// A quarter of the fleet.
    fn default() -> Self {
        BatchSize::Percent(25)
    }
}

impl BatchSize {
    /// Hosts per batch in a fleet of `hosts` (at least 1).
    pub fn of(self, hosts: usize) -> usize {
        match self {
            BatchSize::Hosts(n) => n.max(1),
            BatchSize::Percent(p) => (hosts * usize::from(p)).div_ceil(100).max(1),
        }
    }
}

impl FromStr for BatchSize {
    type Err = String;

    /// `N` (hosts) or `P%` (of the fleet).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not a batch size: use a number of hosts (2) or a percentage of the fleet (25%)")
        };
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(BatchSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(BatchSize::Hosts(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Hosts(n) => write!(f, "{n}"),
            BatchSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Which step of the rollout a host belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind", content = "number")]
pub enum Phase {
    /// The canary: must all be healthy before anything else moves.
    Canary,
    /// Batch `n` after the canary, counted from 1.
    Batch(usize),
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Canary => f.write_str("canary"),
            Phase::Batch(n) => write!(f, "batch {n}"),
        }
    }
}

/// The steps of a rollout, each a list of host indices, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `(phase, hosts)` in the order they run; no host appears twice, every host appears once.
    pub steps: Vec<(Phase, Vec<usize>)>,
}

/// Canary hosts when none are asked for: one when there are three hosts or more.
pub fn default_canary(hosts: usize) -> usize {
    usize::from(hosts >= 3)
}

impl Plan {
    /// Plans a rollout to `hosts` hosts (in the order given): `canary` hosts first (default
    /// [`default_canary`]), then batches of `batch`.
    pub fn new(hosts: usize, canary: Option<usize>, batch: BatchSize) -> Result<Self, String> {
        if hosts == 0 {
            return Err(
                "no hosts to roll out to: give --to URL (repeatable) or --hosts FILE".into(),
            );
        }
        let canary = canary.unwrap_or_else(|| default_canary(hosts));
        if canary > hosts {
            return Err(format!(
                "--canary {canary} is more than the {hosts} hosts of the rollout"
            ));
        }
        let mut steps = Vec::new();
        if canary > 0 {
            steps.push((Phase::Canary, (0..canary).collect()));
        }
        let size = batch.of(hosts);
        let rest: Vec<usize> = (canary..hosts).collect();
        for (n, chunk) in rest.chunks(size).enumerate() {
            steps.push((Phase::Batch(n + 1), chunk.to_vec()));
        }
        Ok(Self { steps })
    }

    /// The phase of each host, by index.
    pub fn phases(&self, hosts: usize) -> Vec<Phase> {
        let mut out = vec![Phase::Batch(1); hosts];
        for (phase, members) in &self.steps {
            for &i in members {
                if let Some(slot) = out.get_mut(i) {
                    *slot = *phase;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(plan: &Plan) -> Vec<(Phase, usize)> {
        plan.steps.iter().map(|(p, h)| (*p, h.len())).collect()
    }

    #[test]
    fn batch_sizes_parse_as_hosts_or_a_share_of_the_fleet() {
        assert_eq!("3".parse(), Ok(BatchSize::Hosts(3)));
        assert_eq!("50%".parse(), Ok(BatchSize::Percent(50)));
        for bad in ["0", "0%", "101%", "-1", "x", "%"] {
            assert!(bad.parse::<BatchSize>().is_err(), "{bad}");
        }
        assert_eq!(BatchSize::Percent(25).of(8), 2);
        assert_eq!(BatchSize::Percent(25).of(3), 1, "rounded up, at least one");
        assert_eq!(BatchSize::Percent(50).of(7), 4);
    }

    #[test]
    fn three_hosts_or_more_get_one_canary_by_default() {
        use Phase::*;
        assert_eq!(
            shape(&Plan::new(1, None, BatchSize::default()).expect("plan")),
            [(Batch(1), 1)]
        );
        assert_eq!(
            shape(&Plan::new(2, None, BatchSize::default()).expect("plan")),
            [(Batch(1), 1), (Batch(2), 1)]
        );
        assert_eq!(
            shape(&Plan::new(4, None, BatchSize::Percent(50)).expect("plan")),
            [(Canary, 1), (Batch(1), 2), (Batch(2), 1)]
        );
        assert_eq!(
            shape(&Plan::new(8, Some(1), BatchSize::Percent(50)).expect("plan")),
            [(Canary, 1), (Batch(1), 4), (Batch(2), 3)]
        );
        assert_eq!(
            shape(&Plan::new(5, Some(0), BatchSize::Hosts(5)).expect("plan")),
            [(Batch(1), 5)]
        );
    }

    #[test]
    fn every_host_is_planned_once_in_the_order_given() {
        let plan = Plan::new(10, Some(2), BatchSize::Hosts(3)).expect("plan");
        let order: Vec<usize> = plan.steps.iter().flat_map(|(_, h)| h.clone()).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        assert_eq!(plan.phases(10)[1], Phase::Canary);
        assert_eq!(plan.phases(10)[9], Phase::Batch(3));
    }

    #[test]
    fn impossible_plans_are_refused() {
        assert!(Plan::new(0, None, BatchSize::default()).is_err());
        assert!(Plan::new(2, Some(3), BatchSize::default()).is_err());
    }
}

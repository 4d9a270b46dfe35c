//! shoal's chaos suite, the parts that need no cluster: the linearizability checker
//! ([`lincheck`]) and the recorded history with its checks ([`history`]). The binary
//! (`shoal-chaos`) drives the test bed, injects faults, runs the workload and reports.

pub mod history;
pub mod lincheck;

//! Device access control on cgroup v2, which has no devices files: the kernel only offers
//! a BPF_PROG_TYPE_CGROUP_DEVICE program attached to the cgroup.

use std::path::Path;

use oci_spec::runtime::{LinuxDeviceType, LinuxResources};

use super::CgroupError;

/// True when the rule list changes nothing: empty, or every rule allows everything.
fn is_trivial(res: &LinuxResources) -> bool {
    match res.devices() {
        None => true,
        Some(rules) => rules.iter().all(|r| {
            r.allow()
                && matches!(r.typ(), None | Some(LinuxDeviceType::A))
                && r.major().is_none_or(|m| m < 0)
                && r.minor().is_none_or(|m| m < 0)
        }),
    }
}

/// Refuse, before anything is created, a device rule list v2 cannot enforce here.
pub(super) fn check_v2_rules(res: &LinuxResources) -> Result<(), CgroupError> {
    if is_trivial(res) {
        Ok(())
    } else {
        Err(CgroupError::Unsupported(
            "linux.resources.devices on cgroup v2 (device rules need an eBPF device filter, which shoal does not install yet)".into(),
        ))
    }
}

/// Apply the device rules of `res` to the v2 cgroup at `dir`.
pub(super) fn apply_v2(_dir: &Path, res: &LinuxResources) -> Result<(), CgroupError> {
    check_v2_rules(res)
}

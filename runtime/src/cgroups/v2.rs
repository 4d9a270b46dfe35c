//! Cgroup v2: one unified tree; controllers are enabled in each ancestor's subtree_control.

use std::path::{Path, PathBuf};
use std::thread::sleep;

use oci_spec::runtime::LinuxResources;

use super::fs::{self, FREEZE_BACKOFF, FREEZE_POLLS};
use super::{refuse_unsupported, shares_to_weight, stats, CgroupError, CgroupManager, CgroupStats};

/// Controllers enabled for every container when the host has them, so stats work even
/// without limits.
const ALWAYS_ENABLED: &[&str] = &["cpu", "memory", "pids"];

/// cpu.max period the kernel uses when none is given.
const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// A container's cgroup in the unified hierarchy.
#[derive(Debug)]
pub struct V2Manager {
    root: PathBuf,
    rel: String,
    dir: PathBuf,
}

/// Controllers the root offers (its cgroup.controllers).
fn available(root: &Path) -> Result<Vec<String>, CgroupError> {
    let s = fs::read_opt(&root.join("cgroup.controllers"))?.unwrap_or_default();
    Ok(s.split_whitespace().map(str::to_string).collect())
}

/// Controllers `res` needs on v2; refuses what v2 cannot express.
fn required(res: &LinuxResources) -> Result<Vec<&'static str>, CgroupError> {
    let mut need = Vec::new();
    if let Some(m) = res.memory() {
        if m.swappiness().is_some() {
            return Err(CgroupError::Unsupported(
                "linux.resources.memory.swappiness on cgroup v2".into(),
            ));
        }
        if m.disable_oom_killer() == Some(true) {
            return Err(CgroupError::Unsupported(
                "linux.resources.memory.disableOOMKiller on cgroup v2".into(),
            ));
        }
        need.push("memory");
    }
    if let Some(c) = res.cpu() {
        if c.shares().is_some()
            || c.quota().is_some()
            || c.period().is_some()
            || c.burst().is_some()
            || c.idle().is_some()
        {
            need.push("cpu");
        }
        if c.cpus().is_some() || c.mems().is_some() {
            need.push("cpuset");
        }
    }
    if res.pids().is_some() {
        need.push("pids");
    }
    if res
        .hugepage_limits()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        need.push("hugetlb");
    }
    if let Some(n) = res.network() {
        if n.class_id().is_some() {
            return Err(CgroupError::ControllerMissing("net_cls".into()));
        }
        if n.priorities().as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(CgroupError::ControllerMissing("net_prio".into()));
        }
    }
    Ok(need)
}

/// OCI memory.swap (memory+swap) → memory.swap.max (swap alone), as runc converts it.
pub(super) fn swap_max(swap: i64, limit: Option<i64>) -> Result<Option<String>, CgroupError> {
    let limit = limit.unwrap_or(0);
    if limit == -1 && swap == 0 {
        return Ok(Some("max".into()));
    }
    match swap {
        -1 => return Ok(Some("max".into())),
        0 => return Ok(None),
        s if s < -1 => {
            return Err(CgroupError::Invalid {
                field: "memory.swap",
                reason: format!("{s} is negative"),
            })
        }
        _ => {}
    }
    if limit <= 0 {
        return Err(CgroupError::Invalid {
            field: "memory.swap",
            reason: "a swap limit needs a memory limit".into(),
        });
    }
    if swap < limit {
        return Err(CgroupError::Invalid {
            field: "memory.swap",
            reason: format!("memory+swap {swap} is below the memory limit {limit}"),
        });
    }
    Ok(Some((swap - limit).to_string()))
}

fn limit_str(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

impl V2Manager {
    /// Make the container's cgroup, enable controllers down the path and apply `res`.
    pub fn create(
        root: &Path,
        rel: &str,
        res: Option<&LinuxResources>,
    ) -> Result<Self, CgroupError> {
        let avail = available(root)?;
        let mut enable: Vec<&str> = ALWAYS_ENABLED
            .iter()
            .copied()
            .filter(|c| avail.iter().any(|a| a == c))
            .collect();
        if let Some(res) = res {
            refuse_unsupported(res)?;
            super::devices::check_v2_rules(res)?;
            for c in required(res)? {
                if !avail.iter().any(|a| a == c) {
                    return Err(CgroupError::ControllerMissing(c.to_string()));
                }
                if !enable.contains(&c) {
                    enable.push(c);
                }
            }
        }
        let created = fs::mkdir_tracked(root, rel)?;
        let mgr = V2Manager {
            root: root.to_path_buf(),
            rel: rel.to_string(),
            dir: root.join(rel),
        };
        let setup = mgr.enable_controllers(&enable).and_then(|()| match res {
            Some(res) => mgr.apply(res),
            None => Ok(()),
        });
        if let Err(e) = setup {
            fs::remove_created(&created);
            return Err(e);
        }
        Ok(mgr)
    }

    /// Find an existing container cgroup.
    pub fn open(root: &Path, rel: &str) -> Result<Self, CgroupError> {
        let dir = root.join(rel);
        if !dir.is_dir() {
            return Err(CgroupError::NotFound(rel.to_string()));
        }
        Ok(V2Manager {
            root: root.to_path_buf(),
            rel: rel.to_string(),
            dir,
        })
    }

    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every ancestor of the leaf (root included) delegates `controllers` to its children.
    fn enable_controllers(&self, controllers: &[&str]) -> Result<(), CgroupError> {
        if controllers.is_empty() {
            return Ok(());
        }
        let line = controllers
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cur = self.root.clone();
        let comps: Vec<&str> = self.rel.split('/').collect();
        for comp in &comps {
            let file = cur.join("cgroup.subtree_control");
            fs::write(&file, &line).map_err(|e| match e {
                // ENOENT on a "+name" token means the parent does not offer it.
                CgroupError::Write { source, .. }
                    if source.raw_os_error() == Some(libc::ENOENT) && file.exists() =>
                {
                    CgroupError::ControllerMissing(controllers.join(" or "))
                }
                e => e,
            })?;
            cur.push(comp);
        }
        Ok(())
    }

    fn apply_memory(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let Some(m) = res.memory() else {
            return Ok(());
        };
        if let Some(limit) = m.limit() {
            fs::write(&self.dir.join("memory.max"), &limit_str(limit))?;
        }
        if let Some(swap) = m.swap() {
            if let Some(v) = swap_max(swap, m.limit())? {
                fs::write(&self.dir.join("memory.swap.max"), &v)?;
            }
        }
        if let Some(r) = m.reservation() {
            fs::write(&self.dir.join("memory.low"), &limit_str(r))?;
        }
        Ok(())
    }

    fn apply_cpu(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = res.cpu() else {
            return Ok(());
        };
        if let Some(s) = c.shares() {
            fs::write(
                &self.dir.join("cpu.weight"),
                &shares_to_weight(s).to_string(),
            )?;
        }
        if c.quota().is_some() || c.period().is_some() {
            let file = self.dir.join("cpu.max");
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                Some(_) => "max".to_string(),
                // Only the period changes: keep the quota already set.
                None => fs::read_opt(&file)?
                    .and_then(|s| s.split_whitespace().next().map(str::to_string))
                    .unwrap_or_else(|| "max".to_string()),
            };
            let period = c.period().unwrap_or(DEFAULT_CPU_PERIOD);
            fs::write(&file, &format!("{quota} {period}"))?;
        }
        if let Some(b) = c.burst() {
            fs::write(&self.dir.join("cpu.max.burst"), &b.to_string())?;
        }
        if let Some(i) = c.idle() {
            fs::write(&self.dir.join("cpu.idle"), &i.to_string())?;
        }
        if let Some(cpus) = c.cpus() {
            fs::write(&self.dir.join("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = c.mems() {
            fs::write(&self.dir.join("cpuset.mems"), mems)?;
        }
        Ok(())
    }

    fn apply_rest(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(p) = res.pids() {
            let v = if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".to_string()
            };
            fs::write(&self.dir.join("pids.max"), &v)?;
        }
        if let Some(h) = res.hugepage_limits() {
            for l in h {
                let file = format!("hugetlb.{}.max", l.page_size());
                fs::write(&self.dir.join(file), &l.limit().to_string())?;
            }
        }
        if let Some(u) = res.unified() {
            for (k, v) in u {
                if k.contains('/') || k.starts_with('.') || k.is_empty() {
                    return Err(CgroupError::Invalid {
                        field: "unified",
                        reason: format!("{k:?} is not a cgroup file name"),
                    });
                }
                fs::write(&self.dir.join(k), v)?;
            }
        }
        Ok(())
    }

    fn events_frozen(&self) -> Result<Option<bool>, CgroupError> {
        let path = self.dir.join("cgroup.events");
        match fs::read_opt(&path)? {
            Some(c) => Ok(fs::keyed_value(&path, &c, "frozen")?.map(|v| v == 1)),
            None => Ok(None),
        }
    }
}

impl CgroupManager for V2Manager {
    fn rel_path(&self) -> &str {
        &self.rel
    }

    fn add_task(&self, pid: i32) -> Result<(), CgroupError> {
        fs::write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn apply(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        refuse_unsupported(res)?;
        required(res)?;
        self.apply_memory(res)?;
        self.apply_cpu(res)?;
        self.apply_rest(res)?;
        super::devices::apply_v2(&self.dir, res)
    }

    fn freeze(&self) -> Result<(), CgroupError> {
        fs::write(&self.dir.join("cgroup.freeze"), "1")?;
        for _ in 0..FREEZE_POLLS {
            if self.events_frozen()? == Some(true) {
                return Ok(());
            }
            sleep(FREEZE_BACKOFF);
        }
        fs::write(&self.dir.join("cgroup.freeze"), "0")?;
        Err(CgroupError::FreezeTimeout(self.dir.clone()))
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        fs::write(&self.dir.join("cgroup.freeze"), "0")
    }

    fn is_frozen(&self) -> Result<bool, CgroupError> {
        Ok(self.events_frozen()? == Some(true))
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        fs::procs_recursive(&self.dir)
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        stats::v2(&self.dir)
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        if !self.dir.is_dir() {
            return Ok(());
        }
        // cgroup.kill (Linux 5.14) kills the whole subtree, frozen or not, with no fork race.
        let kill_file = self.dir.join("cgroup.kill");
        if self.pids()?.is_empty() {
            // Nothing to kill; skip the freezer round trip.
        } else if kill_file.exists() {
            fs::write(&kill_file, "1")?;
        } else {
            let frozen = self.freeze().is_ok();
            fs::kill_all(&self.pids()?)?;
            if frozen {
                self.thaw()?;
            }
        }
        fs::kill_until_empty(&self.dir)?;
        fs::remove_subtree(&self.dir)
    }
}

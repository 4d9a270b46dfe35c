//! Cgroup v1: one directory per controller hierarchy, the container's cgroup in each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::sleep;

use oci_spec::runtime::{LinuxDeviceType, LinuxResources};

use super::fs::{self, FREEZE_BACKOFF, FREEZE_POLLS};
use super::{refuse_unsupported, stats, CgroupError, CgroupManager, CgroupStats};

/// Controllers shoal places a container in when the host mounts them.
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "devices", "blkio", "hugetlb",
    "net_cls", "net_prio",
];

/// Polls in FREEZING after which FROZEN is written again (a task that was forking when the
/// first write landed can leave the cgroup stuck in FREEZING).
const FREEZE_REWRITE_EVERY: u32 = 20;

/// A container's cgroup in each v1 hierarchy the host mounts.
#[derive(Debug)]
pub struct V1Manager {
    rel: String,
    /// Controller → hierarchy root (e.g. "memory" → /sys/fs/cgroup/memory).
    roots: BTreeMap<&'static str, PathBuf>,
    /// Controller → the container's directory in that hierarchy.
    dirs: BTreeMap<&'static str, PathBuf>,
}

/// Controllers mounted under `root`, each with its hierarchy root; co-mounted controllers
/// (cpu,cpuacct) share one directory.
fn mounted(root: &Path) -> BTreeMap<&'static str, PathBuf> {
    V1_CONTROLLERS
        .iter()
        .filter_map(|c| {
            let p = root.join(c);
            p.is_dir().then(|| (*c, p.canonicalize().unwrap_or(p)))
        })
        .collect()
}

/// Controllers `res` needs on v1; refuses what v1 cannot express.
fn required(res: &LinuxResources) -> Result<Vec<&'static str>, CgroupError> {
    let mut need = Vec::new();
    if res.memory().is_some() {
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
    if res.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        need.push("devices");
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
            need.push("net_cls");
        }
        if n.priorities().as_ref().is_some_and(|p| !p.is_empty()) {
            need.push("net_prio");
        }
    }
    if res.unified().as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(CgroupError::Unsupported(
            "linux.resources.unified on a cgroup v1 host".into(),
        ));
    }
    Ok(need)
}

impl V1Manager {
    /// Make the container's cgroup in every mounted hierarchy and apply `res`.
    pub fn create(
        root: &Path,
        rel: &str,
        res: Option<&LinuxResources>,
    ) -> Result<Self, CgroupError> {
        let roots = mounted(root);
        if let Some(res) = res {
            refuse_unsupported(res)?;
            for c in required(res)? {
                if !roots.contains_key(c) {
                    return Err(CgroupError::ControllerMissing(c.to_string()));
                }
            }
        }
        let mut created: Vec<PathBuf> = Vec::new();
        let mut dirs = BTreeMap::new();
        let mut made_roots: Vec<&PathBuf> = Vec::new();
        for (c, r) in &roots {
            let dir = r.join(rel);
            if !made_roots.contains(&r) {
                match fs::mkdir_tracked(r, rel) {
                    Ok(mut v) => created.append(&mut v),
                    Err(e) => {
                        fs::remove_created(&created);
                        return Err(e);
                    }
                }
                made_roots.push(r);
            }
            dirs.insert(*c, dir);
        }
        let mgr = V1Manager {
            rel: rel.to_string(),
            roots: roots.clone(),
            dirs,
        };
        let setup = mgr.init_cpuset().and_then(|()| match res {
            Some(res) => mgr.apply(res),
            None => Ok(()),
        });
        if let Err(e) = setup {
            fs::remove_created(&created);
            return Err(e);
        }
        Ok(mgr)
    }

    /// Find the container's cgroup in the hierarchies that hold it.
    pub fn open(root: &Path, rel: &str) -> Result<Self, CgroupError> {
        let roots = mounted(root);
        let dirs: BTreeMap<_, _> = roots
            .iter()
            .map(|(c, r)| (*c, r.join(rel)))
            .filter(|(_, d)| d.is_dir())
            .collect();
        if dirs.is_empty() {
            return Err(CgroupError::NotFound(rel.to_string()));
        }
        Ok(V1Manager {
            rel: rel.to_string(),
            roots,
            dirs,
        })
    }

    /// The container's directory for `controller`, if that hierarchy is mounted.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs.get(controller).map(PathBuf::as_path)
    }

    fn need(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.dir(controller)
            .ok_or_else(|| CgroupError::ControllerMissing(controller.to_string()))
    }

    /// Distinct directories (co-mounted controllers share one).
    fn unique_dirs(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = self.dirs.values().map(PathBuf::as_path).collect();
        v.sort();
        v.dedup();
        v
    }

    /// A new cpuset cgroup starts with empty cpus/mems and refuses tasks until they are set:
    /// copy them down from the parent at every level of the path.
    fn init_cpuset(&self) -> Result<(), CgroupError> {
        let Some(root) = self.roots.get("cpuset") else {
            return Ok(());
        };
        let mut parent = root.clone();
        for comp in self.rel.split('/') {
            let child = parent.join(comp);
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let cur = fs::read_opt(&child.join(file))?.unwrap_or_default();
                if cur.trim().is_empty() {
                    let from = fs::read(&parent.join(file))?;
                    fs::write(&child.join(file), from.trim())?;
                }
            }
            parent = child;
        }
        Ok(())
    }

    fn apply_memory(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let Some(m) = res.memory() else {
            return Ok(());
        };
        let dir = self.need("memory")?;
        let limit_file = dir.join("memory.limit_in_bytes");
        let memsw_file = dir.join("memory.memsw.limit_in_bytes");
        if let Some(swap) = m.swap() {
            let memsw_root = self.roots["memory"].join("memory.memsw.limit_in_bytes");
            if !memsw_root.exists() {
                return Err(CgroupError::Unsupported(
                    "linux.resources.memory.swap: the kernel has no swap accounting (memory.memsw)"
                        .into(),
                ));
            }
            if let Some(limit) = m.limit() {
                if swap != -1 && limit != -1 && swap < limit {
                    return Err(CgroupError::Invalid {
                        field: "memory.swap",
                        reason: format!("memory+swap {swap} is below the memory limit {limit}"),
                    });
                }
            }
            // The kernel insists memsw >= limit at every moment: raise memsw first when the
            // new memsw is above the current limit, lower the limit first otherwise.
            let cur_limit = fs::read_opt(&limit_file)?
                .and_then(|s| s.trim().parse::<i64>().ok())
                .unwrap_or(i64::MAX);
            if swap == -1 || cur_limit < swap {
                fs::write(&memsw_file, &swap.to_string())?;
                if let Some(limit) = m.limit() {
                    fs::write(&limit_file, &limit.to_string())?;
                }
            } else {
                if let Some(limit) = m.limit() {
                    fs::write(&limit_file, &limit.to_string())?;
                }
                fs::write(&memsw_file, &swap.to_string())?;
            }
        } else if let Some(limit) = m.limit() {
            // The kernel refuses a limit above memory+swap with a bare EINVAL; say why.
            let memsw = fs::read_opt(&memsw_file)?.and_then(|s| s.trim().parse::<i64>().ok());
            if let Some(memsw) = memsw.filter(|sw| limit == -1 || limit > *sw) {
                return Err(CgroupError::Invalid {
                    field: "memory.limit",
                    reason: format!(
                        "{limit} is above the current memory+swap limit {memsw}; set memory.swap too"
                    ),
                });
            }
            fs::write(&limit_file, &limit.to_string())?;
        }
        if let Some(r) = m.reservation() {
            fs::write(&dir.join("memory.soft_limit_in_bytes"), &r.to_string())?;
        }
        if let Some(s) = m.swappiness() {
            if s > 100 {
                return Err(CgroupError::Invalid {
                    field: "memory.swappiness",
                    reason: format!("{s} is above 100"),
                });
            }
            fs::write(&dir.join("memory.swappiness"), &s.to_string())?;
        }
        if m.disable_oom_killer() == Some(true) {
            fs::write(&dir.join("memory.oom_control"), "1")?;
        }
        Ok(())
    }

    fn apply_cpu(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = res.cpu() else {
            return Ok(());
        };
        if c.shares().is_some()
            || c.period().is_some()
            || c.quota().is_some()
            || c.burst().is_some()
            || c.idle().is_some()
        {
            let dir = self.need("cpu")?;
            if let Some(s) = c.shares() {
                fs::write(&dir.join("cpu.shares"), &s.to_string())?;
            }
            // The period is written first so a quota is checked against the new period.
            if let Some(p) = c.period() {
                fs::write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
            if let Some(q) = c.quota() {
                let q = if q <= 0 { -1 } else { q };
                fs::write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
            }
            if let Some(b) = c.burst() {
                fs::write(&dir.join("cpu.cfs_burst_us"), &b.to_string())?;
            }
            if let Some(i) = c.idle() {
                fs::write(&dir.join("cpu.idle"), &i.to_string())?;
            }
        }
        if c.cpus().is_some() || c.mems().is_some() {
            let dir = self.need("cpuset")?;
            if let Some(cpus) = c.cpus() {
                fs::write(&dir.join("cpuset.cpus"), cpus)?;
            }
            if let Some(mems) = c.mems() {
                fs::write(&dir.join("cpuset.mems"), mems)?;
            }
        }
        Ok(())
    }

    fn apply_devices(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        let Some(rules) = res.devices() else {
            return Ok(());
        };
        if rules.is_empty() {
            return Ok(());
        }
        let dir = self.need("devices")?;
        for r in rules {
            let line = device_rule_line(r.typ(), r.major(), r.minor(), r.access().as_deref())?;
            let file = if r.allow() {
                "devices.allow"
            } else {
                "devices.deny"
            };
            fs::write(&dir.join(file), &line)?;
        }
        Ok(())
    }

    fn apply_rest(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(p) = res.pids() {
            let dir = self.need("pids")?;
            let v = if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".to_string()
            };
            fs::write(&dir.join("pids.max"), &v)?;
        }
        if let Some(h) = res.hugepage_limits() {
            if !h.is_empty() {
                let dir = self.need("hugetlb")?;
                for l in h {
                    let file = format!("hugetlb.{}.limit_in_bytes", l.page_size());
                    fs::write(&dir.join(file), &l.limit().to_string())?;
                }
            }
        }
        if let Some(n) = res.network() {
            if let Some(id) = n.class_id() {
                fs::write(
                    &self.need("net_cls")?.join("net_cls.classid"),
                    &id.to_string(),
                )?;
            }
            if let Some(prios) = n.priorities() {
                for p in prios {
                    let dir = self.need("net_prio")?;
                    let line = format!("{} {}", p.name(), p.priority());
                    fs::write(&dir.join("net_prio.ifpriomap"), &line)?;
                }
            }
        }
        Ok(())
    }
}

/// One v1 devices.allow/deny line: "c 1:3 rwm", "a *:* rwm".
pub(super) fn device_rule_line(
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: Option<&str>,
) -> Result<String, CgroupError> {
    let t = match typ.unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => "a",
        LinuxDeviceType::B => "b",
        LinuxDeviceType::C | LinuxDeviceType::U => "c",
        LinuxDeviceType::P => {
            return Err(CgroupError::Invalid {
                field: "devices.type",
                reason: "fifo (\"p\") rules are not expressible in the devices cgroup".into(),
            })
        }
    };
    let num = |v: Option<i64>| match v {
        Some(n) if n >= 0 => n.to_string(),
        _ => "*".to_string(),
    };
    let access = access.filter(|a| !a.is_empty()).unwrap_or("rwm");
    if !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(CgroupError::Invalid {
            field: "devices.access",
            reason: format!("{access:?} is not a combination of r, w, m"),
        });
    }
    Ok(format!("{t} {}:{} {access}", num(major), num(minor)))
}

impl CgroupManager for V1Manager {
    fn rel_path(&self) -> &str {
        &self.rel
    }

    fn add_task(&self, pid: i32) -> Result<(), CgroupError> {
        for d in self.unique_dirs() {
            fs::write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn apply(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        refuse_unsupported(res)?;
        for c in required(res)? {
            self.need(c)?;
        }
        self.apply_memory(res)?;
        self.apply_cpu(res)?;
        self.apply_devices(res)?;
        self.apply_rest(res)
    }

    fn freeze(&self) -> Result<(), CgroupError> {
        let file = self.need("freezer")?.join("freezer.state");
        fs::write(&file, "FROZEN")?;
        for i in 1..=FREEZE_POLLS {
            let state = fs::read(&file)?;
            if state.trim() == "FROZEN" {
                return Ok(());
            }
            if i % FREEZE_REWRITE_EVERY == 0 {
                fs::write(&file, "FROZEN")?;
            }
            sleep(FREEZE_BACKOFF);
        }
        // Leave it running rather than half-frozen.
        fs::write(&file, "THAWED")?;
        Err(CgroupError::FreezeTimeout(file))
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        fs::write(&self.need("freezer")?.join("freezer.state"), "THAWED")
    }

    fn is_frozen(&self) -> Result<bool, CgroupError> {
        let s = fs::read(&self.need("freezer")?.join("freezer.state"))?;
        Ok(s.trim() == "FROZEN")
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = ["freezer", "pids", "memory", "cpu"]
            .iter()
            .find_map(|c| self.dir(c))
            .or_else(|| self.unique_dirs().first().copied());
        match dir {
            Some(d) => fs::procs_recursive(d),
            None => Ok(Vec::new()),
        }
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        stats::v1(self.dir("cpuacct"), self.dir("memory"), self.dir("pids"))
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        // Freeze so nothing forks between listing and killing, kill, then thaw: a frozen
        // task only dies once thawed.
        if self.dir("freezer").is_some() {
            let frozen = self.freeze().is_ok();
            let pids = self.pids()?;
            fs::kill_all(&pids)?;
            if frozen || self.is_frozen().unwrap_or(false) {
                self.thaw()?;
            }
        }
        let mut first_err = None;
        for d in self.unique_dirs() {
            let res = fs::kill_until_empty(d).and_then(|()| fs::remove_subtree(d));
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

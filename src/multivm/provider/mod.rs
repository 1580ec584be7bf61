//! The OpenFaaS provider API on multivm (the faas-provider routes under
//! `/system/`): list, deploy, update, describe, scale and remove functions
//! at run time, plus `/system/info` and `/system/namespaces`.
//!
//! A deployment's `image` names an appfs image file or a function
//! directory under the config's `deploy.image_dir`; its runtime (kernel,
//! rootfs, memory, language snapshot) comes from `deploy.runtimes`, chosen
//! by the `com.snapvm.runtime` label or annotation (types.rs has every
//! key). Deploying checks the request, stores it (store.rs) and answers
//! 202; preparation runs in the background — copying the image, or
//! building it from the directory with `mkappfs`, then writing a diff
//! snapshot on the runtime's language snapshot if it has one — and only
//! then registers the function with the scheduler (an update keeps the
//! old version serving until then). The state shows in the status as the
//! annotation `com.snapvm.state` (`preparing`, `ready`, `failed`, with the
//! reason in `com.snapvm.error`).
//!
//! Functions declared in the YAML config are listed too, but the API
//! refuses to change, scale or remove them (409).
//!
//! Locking: `entries` is taken before the scheduler's lock, never after,
//! and is held while a deployment is registered or removed, so a
//! preparation that finishes after its function was removed or
//! redeployed can never register it again.

pub mod auth;
pub mod store;
pub mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::config::{Config, DeployConfig, Function, Runtime, MIN_MEMORY_MIB};
use super::scheduler::{Scheduler, SchedulerError};
use crate::launcher::{Launch, VmProcess};
use auth::Credentials;
use store::{Record, Store, StoreError};
use types::{
    check_namespace, parse_json, DeleteFunctionRequest, DeploymentError, FunctionDeployment,
    FunctionStatus, Plan, ScaleServiceRequest, KEY_PREFIX, NAMESPACE,
};

/// Annotation keys snapvm adds to a status.
const STATE_KEY: &str = "com.snapvm.state";
const ERROR_KEY: &str = "com.snapvm.error";
const SOURCE_KEY: &str = "com.snapvm.source";

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Request(#[from] DeploymentError),
    #[error("{0}")]
    Invalid(String),
    #[error("no function named {0:?}")]
    NotFound(String),
    #[error("function {0:?} exists already; update it with PUT /system/functions")]
    Exists(String),
    #[error("function {0:?} is declared in multivm's config file; change or remove it there")]
    Declared(String),
    #[error("deploying at run time is not configured: add a deploy section to the config")]
    NotConfigured,
    #[error("cannot store the deployment: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
}

impl ProviderError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ProviderError::Request(_) | ProviderError::Invalid(_) => 400,
            ProviderError::NotFound(_) => 404,
            ProviderError::Exists(_) | ProviderError::Declared(_) => 409,
            ProviderError::NotConfigured => 501,
            ProviderError::Store(_) => 500,
            ProviderError::Scheduler(e) => e.status(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Prep {
    Preparing,
    Ready,
    Failed(String),
}

struct Entry {
    record: Record,
    state: Prep,
    /// Bumped by every deployment of the name: a preparation registers its
    /// result only if its version is still the entry's.
    version: u64,
    /// The build directory of the version the scheduler runs.
    build: Option<PathBuf>,
}

/// What a preparation needs, fixed when the deployment was accepted.
struct Job {
    name: String,
    version: u64,
    plan: Plan,
    runtime: Runtime,
    source: PathBuf,
    /// The function as it will run, without its appfs and snapshot yet.
    spec: Function,
}

pub struct Provider {
    sched: Arc<Scheduler>,
    cfg: Arc<Config>,
    budget_mib: u64,
    store: Option<Store>,
    credentials: Option<Credentials>,
    entries: Mutex<BTreeMap<String, Entry>>,
    next_version: Mutex<u64>,
}

impl Provider {
    /// The provider over `sched`; re-deploys the stored functions (their
    /// preparation runs in the background).
    pub fn start(
        sched: Arc<Scheduler>,
        cfg: Arc<Config>,
        budget_mib: u64,
        credentials: Option<Credentials>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = cfg
            .deploy
            .as_ref()
            .map(|d| Store::open(&d.state_dir))
            .transpose()?;
        let records = store.as_ref().map(Store::load_all).transpose()?;
        let me = Arc::new(Self {
            sched,
            cfg,
            budget_mib,
            store,
            credentials,
            entries: Mutex::new(BTreeMap::new()),
            next_version: Mutex::new(1),
        });
        for (name, record) in records.unwrap_or_default() {
            if me.declared(&name) {
                log::warn!("ignoring the stored deployment of {name}: the config declares it");
                continue;
            }
            let version = me.version();
            let job = me.job(&record, version);
            let state = match &job {
                Ok(_) => Prep::Preparing,
                Err(e) => {
                    log::warn!("stored function {name} cannot be deployed again: {e}");
                    Prep::Failed(e.to_string())
                }
            };
            me.lock().insert(
                name,
                Entry {
                    record,
                    state,
                    version,
                    build: None,
                },
            );
            if let Ok(job) = job {
                me.spawn_prepare(job);
            }
        }
        Ok(me)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn version(&self) -> u64 {
        let mut v = self.next_version.lock().unwrap_or_else(|e| e.into_inner());
        *v += 1;
        *v
    }

    fn declared(&self, name: &str) -> bool {
        self.cfg.functions.iter().any(|f| f.name == name)
    }

    fn deploy_cfg(&self) -> Result<(&DeployConfig, &Store), ProviderError> {
        match (&self.cfg.deploy, &self.store) {
            (Some(d), Some(s)) => Ok((d, s)),
            _ => Err(ProviderError::NotConfigured),
        }
    }

    /// Whether a request's `Authorization` header lets it use `/system/*`.
    /// Whether `/system/*` asks for credentials (`--basic_auth_dir`).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    pub fn authorized(&self, authorization: Option<&str>) -> bool {
        self.credentials
            .as_ref()
            .is_none_or(|c| c.accepts(authorization))
    }

    /// Why function `name` cannot take requests although it is deployed
    /// (being prepared, or its preparation failed); `None` otherwise.
    pub fn not_ready(&self, name: &str) -> Option<String> {
        match &self.lock().get(name)?.state {
            Prep::Preparing => Some(format!("function {name} is being prepared; retry shortly")),
            Prep::Failed(why) => Some(format!("function {name} failed to deploy: {why}")),
            Prep::Ready => None,
        }
    }

    /// Checks a deployment against the config and the budget and fixes
    /// everything its preparation needs.
    fn job(&self, record: &Record, version: u64) -> Result<Job, ProviderError> {
        let (deploy, _) = self.deploy_cfg()?;
        let d = &record.deployment;
        let plan = d.plan(deploy.default_runtime.as_deref())?;
        let runtime = deploy.runtimes.get(&plan.runtime).ok_or_else(|| {
            let known: Vec<&str> = deploy.runtimes.keys().map(String::as_str).collect();
            ProviderError::Invalid(format!(
                "{KEY_PREFIX}runtime: no runtime {:?} in the config (it has: {})",
                plan.runtime,
                known.join(", ")
            ))
        })?;
        let source = resolve_image(&deploy.image_dir, &plan.image)?;
        if source.is_dir() && deploy.mkappfs.is_none() {
            return Err(ProviderError::Invalid(format!(
                "image {} is a directory, and the config's deploy section has no mkappfs to build it",
                plan.image.display()
            )));
        }
        let memory_mib = plan.memory_mib.unwrap_or(runtime.memory_mib);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ProviderError::Invalid(format!(
                "limits.memory: a VM needs at least {MIN_MEMORY_MIB} MiB"
            )));
        }
        if runtime.snapshot.is_some() && memory_mib != runtime.memory_mib {
            return Err(ProviderError::Invalid(format!(
                "limits.memory: runtime {} restores from a snapshot of {} MiB; drop the limit or set it to {}Mi",
                plan.runtime, runtime.memory_mib, runtime.memory_mib
            )));
        }
        let footprint = memory_mib + self.cfg.vm_overhead_mib;
        let concurrency_limit = plan.concurrency_limit.unwrap_or_else(|| {
            usize::try_from(self.budget_mib / footprint)
                .unwrap_or(1)
                .max(1)
        });
        let min_idle = record.min_idle.unwrap_or(plan.min_idle);
        if min_idle > concurrency_limit {
            return Err(ProviderError::Invalid(format!(
                "min_idle {min_idle} exceeds the concurrency_limit of {concurrency_limit}"
            )));
        }
        let spec = Function {
            name: d.service.clone(),
            kernel: runtime.kernel.clone(),
            cmdline: runtime.cmdline.clone(),
            rootfs: runtime.rootfs.clone(),
            appfs: None,
            vcpus: runtime.vcpus,
            memory_mib,
            concurrency_limit,
            load_dir: None,
            copy_base: false,
            copy_diff: false,
            load_ws: false,
            network: false,
            keep_state: false,
            min_idle,
            idle_timeout: plan
                .idle_timeout
                .unwrap_or(super::config::DEFAULT_IDLE_TIMEOUT),
            request_timeout: plan
                .request_timeout
                .unwrap_or(super::config::DEFAULT_REQUEST_TIMEOUT),
            max_queue: plan
                .max_queue
                .unwrap_or(usize::try_from(super::config::DEFAULT_MAX_QUEUE).unwrap_or(usize::MAX)),
        };
        self.sched.check_fits(&spec)?;
        Ok(Job {
            name: d.service.clone(),
            version,
            plan,
            runtime: runtime.clone(),
            source,
            spec,
        })
    }

    /// POST (`update` false) or PUT (`update` true) /system/functions.
    pub fn deploy(self: &Arc<Self>, body: &[u8], update: bool) -> Result<Value, ProviderError> {
        let (_, store) = self.deploy_cfg()?;
        let deployment = FunctionDeployment::parse(body)?;
        let name = deployment.service.clone();
        if self.declared(&name) {
            return Err(ProviderError::Declared(name));
        }
        let record = Record {
            deployment,
            min_idle: None,
        };
        let version = self.version();
        let job = self.job(&record, version)?;
        {
            let mut entries = self.lock();
            match (entries.contains_key(&name), update) {
                (true, false) => return Err(ProviderError::Exists(name)),
                (false, true) => return Err(ProviderError::NotFound(name)),
                _ => {}
            }
            store.save(&name, &record)?;
            let build = entries.get_mut(&name).and_then(|e| e.build.take());
            entries.insert(
                name.clone(),
                Entry {
                    record,
                    state: Prep::Preparing,
                    version,
                    build,
                },
            );
        }
        log::info!("deploying {name} (version {version})");
        self.spawn_prepare(job);
        self.status(&name)
    }

    fn spawn_prepare(self: &Arc<Self>, job: Job) {
        let me = Arc::clone(self);
        let (name, version) = (job.name.clone(), job.version);
        let spawned = std::thread::Builder::new()
            .name(format!("prepare-{name}"))
            .spawn(move || me.prepare(job));
        if let Err(e) = spawned {
            log::error!("cannot start a preparation thread: {e}");
            if let Some(entry) = self.lock().get_mut(&name).filter(|e| e.version == version) {
                entry.state = Prep::Failed(format!("cannot start its preparation: {e}"));
            }
        }
    }

    /// Prepares `job` and, if its version is still current, registers it.
    fn prepare(&self, job: Job) {
        let (name, version) = (job.name.clone(), job.version);
        let build = self
            .deploy_cfg()
            .and_then(|(_, store)| store.new_build_dir(&name).map_err(ProviderError::from));
        let result = build.and_then(|dir| {
            let r = self.build(&job, &dir).map_err(ProviderError::Invalid);
            Ok((dir, r?))
        });
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&name).filter(|e| e.version == version) else {
            drop(entries);
            log::info!("{name} version {version} was replaced or removed while being prepared");
            if let Ok((dir, _)) = result {
                let _ = std::fs::remove_dir_all(dir);
            }
            return;
        };
        let registered = result.and_then(|(dir, mut spec)| {
            if let Some(n) = entry.record.min_idle {
                spec.min_idle = n; // scaled while being prepared
            }
            match self.sched.deploy(spec) {
                Ok(()) => Ok(dir),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(ProviderError::from(e))
                }
            }
        });
        match registered {
            Ok(dir) => {
                log::info!("{name} version {version} is ready");
                entry.state = Prep::Ready;
                if let Some(old) = entry.build.replace(dir) {
                    let _ = std::fs::remove_dir_all(old);
                }
            }
            Err(e) => {
                log::warn!("preparing {name} failed: {e}");
                entry.state = Prep::Failed(e.to_string());
            }
        }
    }

    /// Makes the appfs (and the diff snapshot) of `job` in `dir`; the
    /// function as it will run.
    fn build(&self, job: &Job, dir: &Path) -> Result<Function, String> {
        let mut spec = job.spec.clone();
        let appfs = if job.source.is_dir() {
            let out = dir.join("appfs.ext2");
            let mkappfs = self
                .cfg
                .deploy
                .as_ref()
                .and_then(|d| d.mkappfs.clone())
                .ok_or("no mkappfs in the config")?;
            let run = Command::new(&mkappfs)
                .arg(&job.source)
                .arg(&out)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", mkappfs.display()))?;
            if !run.status.success() {
                return Err(format!(
                    "building the appfs of {} failed: {}",
                    job.plan.image.display(),
                    String::from_utf8_lossy(&run.stderr).trim()
                ));
            }
            out
        } else {
            let out = dir.join("appfs.img");
            std::fs::copy(&job.source, &out)
                .map_err(|e| format!("cannot copy {}: {e}", job.source.display()))?;
            out
        };
        spec.appfs = Some(appfs);
        if let Some(base) = &job.runtime.snapshot {
            let diff = dir.join("diff");
            spec.load_dir = Some(base.display().to_string());
            let mut vm_args = spec.firerunner_args(self.cfg.no_seccomp);
            vm_args.push("--dump_dir".into());
            vm_args.push(diff.clone().into());
            let launch = Launch {
                firerunner: self.cfg.firerunner.clone(),
                vm_args,
                console: Some(dir.join("snapshot-console.log")),
                // It runs the function's code: jailed like its VMs.
                jail: self.sched.jail().cloned(),
                network: false,
            };
            let mut vm = VmProcess::spawn(&launch).map_err(|e| e.to_string())?;
            let status = vm
                .wait_for_exit(self.cfg.boot_timeout)
                .map_err(|e| format!("writing the diff snapshot failed: {e}"))?;
            if !status.success() || !diff.join("snapshot.json").is_file() {
                return Err(format!(
                    "writing the diff snapshot failed: firerunner {status}: {}",
                    vm.failure_detail()
                ));
            }
            spec.load_dir = Some(format!("{},{}", base.display(), diff.display()));
        }
        spec.check()?;
        Ok(spec)
    }

    /// DELETE /system/functions.
    pub fn delete(&self, body: &[u8]) -> Result<(), ProviderError> {
        let (_, store) = self.deploy_cfg()?;
        let req: DeleteFunctionRequest = parse_json("DeleteFunctionRequest", body)?;
        check_namespace(req.namespace.as_deref())?;
        let name = req.function_name;
        super::config::check_name(&name)
            .map_err(|e| ProviderError::Invalid(format!("functionName: {e}")))?;
        if self.declared(&name) {
            return Err(ProviderError::Declared(name));
        }
        let mut entries = self.lock();
        if !entries.contains_key(&name) {
            return Err(ProviderError::NotFound(name));
        }
        store.remove(&name)?;
        let entry = entries.remove(&name);
        match self.sched.remove_function(&name) {
            Ok(()) | Err(SchedulerError::NoSuchFunction(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(dir) = entry.and_then(|e| e.build) {
            let _ = std::fs::remove_dir_all(dir);
        }
        log::info!("removed {name}");
        Ok(())
    }

    /// POST /system/scale-function/{name}: sets the function's `min_idle`.
    pub fn scale(&self, name: &str, body: &[u8]) -> Result<(), ProviderError> {
        let (_, store) = self.deploy_cfg()?;
        let req: ScaleServiceRequest = parse_json("ScaleServiceRequest", body)?;
        check_namespace(req.namespace.as_deref())?;
        if req
            .service_name
            .as_deref()
            .is_some_and(|s| !s.is_empty() && s != name)
        {
            return Err(ProviderError::Invalid(format!(
                "serviceName {:?} does not match the path's {name:?}",
                req.service_name.unwrap_or_default()
            )));
        }
        if self.declared(name) {
            return Err(ProviderError::Declared(name.to_string()));
        }
        let replicas = usize::try_from(req.replicas).unwrap_or(usize::MAX);
        let mut entries = self.lock();
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ProviderError::NotFound(name.to_string()))?;
        let mut record = entry.record.clone();
        record.min_idle = Some(replicas);
        // Checked against the budget and concurrency_limit like a deployment.
        let job = self.job(&record, entry.version)?;
        if entry.state == Prep::Ready {
            if let Some(live) = self
                .sched
                .functions()
                .into_iter()
                .find(|f| f.spec.name == name)
            {
                let mut spec = (*live.spec).clone();
                spec.min_idle = job.spec.min_idle;
                self.sched.deploy(spec)?;
            }
        }
        store.save(name, &record)?;
        entry.record = record;
        Ok(())
    }

    /// GET /system/function/{name}.
    pub fn status(&self, name: &str) -> Result<Value, ProviderError> {
        self.statuses()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| json!(s))
            .ok_or_else(|| ProviderError::NotFound(name.to_string()))
    }

    /// GET /system/functions: declared functions, then deployed ones.
    pub fn list(&self) -> Value {
        json!(self.statuses())
    }

    fn statuses(&self) -> Vec<FunctionStatus> {
        let live = self.sched.functions();
        let entries = self.lock();
        let mut out = Vec::new();
        let counts = |s: &mut FunctionStatus| {
            if let Some(l) = live.iter().find(|l| l.spec.name == s.name) {
                s.replicas = (l.launching + l.idle + l.busy) as u64;
                s.available_replicas = (l.idle + l.busy) as u64;
            }
            s.invocation_count = self.sched.metrics.invocations(&s.name);
        };
        for f in &self.cfg.functions {
            let mut s = FunctionStatus {
                name: f.name.clone(),
                image: f
                    .appfs
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                namespace: NAMESPACE.to_string(),
                read_only_root_filesystem: true,
                ..Default::default()
            };
            s.annotations.insert(SOURCE_KEY.into(), "config".into());
            s.annotations.insert(STATE_KEY.into(), "ready".into());
            counts(&mut s);
            out.push(s);
        }
        for (name, e) in entries.iter() {
            let d = &e.record.deployment;
            let mut s = FunctionStatus {
                name: name.clone(),
                image: d.image.clone(),
                namespace: NAMESPACE.to_string(),
                env_process: d.env_process.clone(),
                constraints: d.constraints.clone(),
                labels: d.labels.clone().unwrap_or_default(),
                annotations: d.annotations.clone().unwrap_or_default(),
                limits: d.limits.clone(),
                requests: d.requests.clone(),
                read_only_root_filesystem: true,
                ..Default::default()
            };
            s.annotations.insert(SOURCE_KEY.into(), "api".into());
            let state = match &e.state {
                Prep::Preparing => "preparing",
                Prep::Ready => "ready",
                Prep::Failed(why) => {
                    s.annotations.insert(ERROR_KEY.into(), why.clone());
                    "failed"
                }
            };
            s.annotations.insert(STATE_KEY.into(), state.into());
            counts(&mut s);
            out.push(s);
        }
        out
    }

    /// GET /system/info.
    pub fn info(&self) -> Value {
        json!({
            "provider": "snapvm",
            "orchestration": "firerunner",
            "version": {"sha": "unknown", "release": env!("CARGO_PKG_VERSION")},
        })
    }

    /// GET /system/namespaces.
    pub fn namespaces(&self) -> Value {
        json!([NAMESPACE])
    }
}

/// `image` under `image_dir`, which it must not leave (through symlinks
/// either) and where it must exist.
fn resolve_image(image_dir: &Path, image: &Path) -> Result<PathBuf, ProviderError> {
    let path = image_dir.join(image);
    let real = path.canonicalize().map_err(|e| {
        ProviderError::Invalid(format!(
            "image: {} not found under {}: {e}",
            image.display(),
            image_dir.display()
        ))
    })?;
    let root = image_dir
        .canonicalize()
        .map_err(|e| ProviderError::Invalid(format!("{}: {e}", image_dir.display())))?;
    if !real.starts_with(&root) {
        return Err(ProviderError::Invalid(format!(
            "image: {} leaves {} through a symbolic link",
            image.display(),
            image_dir.display()
        )));
    }
    if !real.is_file() && !real.is_dir() {
        return Err(ProviderError::Invalid(format!(
            "image: {} is neither a file nor a directory",
            image.display()
        )));
    }
    Ok(real)
}

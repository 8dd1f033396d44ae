//! The agent's kernel side: the loaded programs and maps, discovery of the target processes,
//! and the edge marks for enforcement, as one value the loop and the commit work on.

use std::collections::BTreeSet;

use log::{info, warn};

use super::commit::KernelSide;
use crate::{
    capture::discovery::{Discovery, TargetSpec},
    capture::loader::Kernel,
    enforce::{self, EnforceError},
    exchange::Tuple,
    pipeline::{ProcChange, Services},
};

pub struct Host {
    pub kernel: Kernel,
    pub discovery: Discovery,
    /// Service names by tgid, for the pipeline's records.
    pub services: Services,
    /// `detection.services`: the edge.
    edge_services: Vec<String>,
    /// Processes marked as the edge in the kernel.
    edge_marked: BTreeSet<u32>,
    /// The capture programs are detached: nothing new is attached.
    stopping: bool,
}

impl Host {
    pub fn new(kernel: Kernel, targets: Vec<TargetSpec>, edge_services: Vec<String>) -> Host {
        Host {
            kernel,
            discovery: Discovery::new(targets),
            services: Services::default(),
            edge_services,
            edge_marked: BTreeSet::new(),
            stopping: false,
        }
    }

    /// Looks for target processes again, attaches to new ones, and tells the pipeline and the
    /// kernel about them.
    pub fn scan(&mut self) {
        self.discovery.scan(&mut self.kernel);
        self.publish();
    }

    /// New targets (a reload): processes that match stay traced, new matches are attached.
    pub fn set_targets(&mut self, targets: Vec<TargetSpec>, edge_services: Vec<String>) {
        self.discovery.set_targets(&mut self.kernel, targets);
        self.edge_services = edge_services;
        self.publish();
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// The first step of a stop: no more capture, so the reader's final drain reads everything
    /// the kernel captured up to here.
    pub fn stop_capture(&mut self, why: &str) {
        let n = self.kernel.stop_capture();
        self.stopping = true;
        info!("{why}: {n} capture programs detached; draining what the kernel captured, then stopping");
    }

    fn publish(&mut self) {
        publish_services(&self.discovery, &self.services);
        self.mark_edge();
    }

    /// Tells the kernel which processes are the platform's edge (`detection.services`): only
    /// their reads are scanned for blocked tokens. Behind a proxy, the app's upstream
    /// connections carry many users' requests and must never be blocked.
    fn mark_edge(&mut self) {
        if !self.kernel.enforcing() {
            return;
        }
        let d = &self.discovery;
        for (pid, p) in &d.procs {
            let Some(t) = p.target else { continue };
            let name = &d.targets()[t].name;
            if (self.edge_services.is_empty() || self.edge_services.contains(name))
                && self.edge_marked.insert(*pid)
            {
                if let Err(e) = self.kernel.set_edge_tgid(*pid, true) {
                    warn!("marking pid {pid} as the edge for enforcement: {e}");
                }
            }
        }
        self.edge_marked.retain(|pid| d.procs.contains_key(pid));
    }
}

fn publish_services(d: &Discovery, services: &Services) {
    if let Ok(mut m) = services.write() {
        m.clear();
        for (pid, p) in &d.procs {
            if let Some(t) = p.target {
                m.insert(*pid, d.targets()[t].name.clone());
            }
        }
    }
}

/// Says which configured plaintext ports nothing listens on yet. The kernel filters on the port
/// itself, so their traffic is captured as soon as a server listens there.
pub fn warn_unserved_ports(ports: &[u16]) {
    let listening = crate::capture::procfs::listening_ports();
    for p in ports.iter().filter(|p| !listening.contains(p)) {
        warn!("nothing listens on plaintext port {p} yet; its traffic is captured as soon as a server does");
    }
}

impl KernelSide for Host {
    type Error = EnforceError;

    fn enforcing(&self) -> bool {
        self.kernel.enforcing()
    }

    fn block_conn(&mut self, t: Tuple) -> Result<(), EnforceError> {
        self.kernel.block_conn(t)
    }

    fn unblock_conn(&mut self, t: Tuple) -> Result<(), EnforceError> {
        self.kernel.unblock_conn(t).map(|_| ())
    }

    fn reset_conn(&mut self, t: Tuple) -> Result<bool, EnforceError> {
        match enforce::destroy(t.local, t.peer) {
            Ok(()) => Ok(true),
            Err(EnforceError::NoSuchConnection { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn block_token(&mut self, hash: u64) -> Result<(), EnforceError> {
        self.kernel.block_token(hash)
    }

    fn unblock_token(&mut self, hash: u64) -> Result<(), EnforceError> {
        self.kernel.unblock_token(hash).map(|_| ())
    }

    fn session_tenant(&mut self, hash: u64, tenant: u64) -> Result<(), EnforceError> {
        self.kernel.set_session_tenant(hash, tenant)
    }

    fn process_changed(&mut self, c: ProcChange) {
        match c {
            // While stopping the probes are gone: nothing new is attached.
            ProcChange::Exec(pid) if !self.stopping => {
                self.discovery.on_exec(&mut self.kernel, pid);
                self.publish();
            }
            ProcChange::Exec(_) => {}
            ProcChange::Exit(pid) => self.discovery.on_exit(pid),
        }
    }
}

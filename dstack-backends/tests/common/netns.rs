//! Test hosts on this machine: each is a network namespace with its own address in
//! 10.231.0.0/16 (a veth pair to the root namespace) and its own sshd, which accepts one
//! generated client key. Everything is removed on drop. Needs root, `ip` and `sshd`
//! (`.ci/run` installs openssh-server).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn sh(command: &str) {
    let status = Command::new("sh").arg("-c").arg(command).status().unwrap();
    assert!(status.success(), "`{command}` failed ({status})");
}

fn keygen(path: &Path) {
    keygen_typed(path, "ed25519");
}

/// A key pair of `kind` (`ed25519`, `rsa`, `ecdsa`) at `path` and `path.pub`.
fn keygen_typed(path: &Path, kind: &str) {
    let _ = std::fs::remove_file(path);
    sh(&format!(
        "ssh-keygen -q -t {kind} -N '' -f {}",
        path.display()
    ));
}

/// One namespace host.
#[derive(Clone)]
pub struct TestHost {
    /// The namespace.
    pub ns: String,
    /// The host's address (inside the namespace).
    pub addr: String,
    veth: String,
    dir: PathBuf,
}

impl TestHost {
    fn sshd_pid(&self) -> PathBuf {
        self.dir.join("sshd.pid")
    }

    fn host_keys(&self) -> PathBuf {
        self.dir.join("host_keys")
    }

    /// (Re)starts sshd with the host keys in the host's directory.
    pub fn start_sshd(&self) {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "SSH fleet tests need sshd: apt-get install openssh-server (as .ci/run does)"
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut keys: Vec<String> = std::fs::read_dir(self.host_keys())
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .filter(|p| !p.ends_with(".pub"))
            .collect();
        keys.sort();
        let keys: String = keys.iter().map(|k| format!("-h {k} ")).collect();
        // The host's logins start plain: this machine's ~/.bashrc may run slow tools (pyenv's
        // rehash, which waits on a lock that a shell killed with its host leaves behind). It
        // is masked in the host's own mount namespace only.
        sh(&format!(
            "ip netns exec {ns} sh -c '[ -f \"$HOME/.bashrc\" ] && mount --bind /dev/null \"$HOME/.bashrc\"; \
             exec /usr/sbin/sshd -f /dev/null {keys}\
             -o ListenAddress={addr} -o PidFile={pid} -o AuthorizedKeysFile={dir}/authorized_keys \
             -o StrictModes=no -o UsePAM=no -o PermitRootLogin=prohibit-password \
             -o MaxStartups=100 -o MaxSessions=100'",
            ns = self.ns,
            dir = self.dir.display(),
            addr = self.addr,
            pid = self.sshd_pid().display(),
        ));
        // sshd forks into the background before it binds its port: wait until it listens.
        let target: std::net::SocketAddr = format!("{}:22", self.addr).parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_millis(200))
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "sshd of {} does not listen",
                self.ns
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // ... and its pid file, written after it binds (a stop right after a start needs it).
        while std::fs::read_to_string(self.sshd_pid()).map_or(true, |p| p.trim().is_empty()) {
            assert!(
                std::time::Instant::now() < deadline,
                "sshd of {} writes no pid file",
                self.ns
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stops sshd and waits until it has exited (the host then refuses connections).
    pub fn stop_sshd(&self) {
        let Ok(pid) = std::fs::read_to_string(self.sshd_pid()) else {
            return;
        };
        let pid = pid.trim();
        let _ = Command::new("kill").arg(pid).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills (SIGKILL) every process in the namespace whose command line contains `needle`.
    pub fn kill(&self, needle: &str) {
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
            {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }

    /// Runs `command` in the host's own mount namespace (that of its sshd, where its logins
    /// and agent live) and returns its output.
    pub fn run_inside(&self, command: &str) -> String {
        let pid = std::fs::read_to_string(self.sshd_pid()).unwrap();
        let out = Command::new("nsenter")
            .args(["-t", pid.trim(), "-m", "sh", "-c", command])
            .output()
            .unwrap();
        assert!(out.status.success(), "`{command}` failed: {:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Cuts (`false`) or restores (`true`) the host's link.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&format!("ip link set {} {state}", self.veth));
    }

    /// Gives sshd a new host key (as a reinstalled host would have).
    pub fn change_host_key(&self) {
        self.set_host_keys(&["ed25519"]);
    }

    /// Restarts sshd with new host keys of these kinds (`ed25519`, `rsa`, `ecdsa`).
    pub fn set_host_keys(&self, kinds: &[&str]) {
        self.stop_sshd();
        let _ = std::fs::remove_dir_all(self.host_keys());
        std::fs::create_dir_all(self.host_keys()).unwrap();
        for kind in kinds {
            keygen_typed(&self.host_keys().join(kind), kind);
        }
        self.start_sshd();
    }

    /// Restarts sshd with `private` (an OpenSSH private key) as its only host key, as
    /// cloud-init does with the `ssh_keys` of a new instance's user data.
    pub fn install_host_key(&self, private: &str) {
        use std::os::unix::fs::PermissionsExt;
        self.stop_sshd();
        let _ = std::fs::remove_dir_all(self.host_keys());
        std::fs::create_dir_all(self.host_keys()).unwrap();
        let path = self.host_keys().join("ed25519");
        std::fs::write(&path, private).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.start_sshd();
    }

    /// The public host key of `kind` (`ssh-… AAAA… comment`).
    pub fn host_public_key(&self, kind: &str) -> String {
        std::fs::read_to_string(self.host_keys().join(format!("{kind}.pub")))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Namespace hosts sharing one client key.
pub struct TestHosts {
    /// The hosts.
    pub hosts: Vec<TestHost>,
    /// The client's private key (accepted by every host).
    pub key: PathBuf,
    /// A key no host accepts.
    pub wrong_key: PathBuf,
    /// Fleets deployed to these hosts: what they installed is removed on drop, even when a
    /// test fails before deleting them.
    fleets: std::sync::Mutex<Vec<String>>,
    /// What lives as long as the hosts (e.g. what boots them: `cloud_init`).
    held: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>,
    _dir: tempfile::TempDir,
}

impl TestHosts {
    /// Starts `n` hosts.
    pub fn start(n: usize) -> TestHosts {
        let hosts = TestHosts::start_booting(n);
        for host in &hosts.hosts {
            host.start_sshd();
        }
        hosts
    }

    /// Starts `n` hosts whose sshd is not running yet: stand-ins for cloud instances, which
    /// answer SSH only once booted (see `cloud_init`).
    pub fn start_booting(n: usize) -> TestHosts {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client_key");
        let wrong_key = dir.path().join("wrong_key");
        keygen(&key);
        keygen(&wrong_key);
        let authorized = std::fs::read_to_string(dir.path().join("client_key.pub")).unwrap();
        let pid = std::process::id();
        let mut hosts = Vec::new();
        for _ in 0..n {
            let k = NEXT.fetch_add(1, Ordering::SeqCst);
            assert!(k < 64, "too many test hosts in one process");
            let ns = format!("dsr{}x{k}", pid % 100_000);
            let veth = format!("v{ns}");
            let (a, b) = (pid % 200 + 20, k * 4);
            let addr = format!("10.231.{a}.{}", b + 2);
            let host_dir = dir.path().join(&ns);
            std::fs::create_dir_all(&host_dir).unwrap();
            std::fs::write(host_dir.join("authorized_keys"), &authorized).unwrap();
            std::fs::create_dir_all(host_dir.join("host_keys")).unwrap();
            keygen(&host_dir.join("host_keys").join("ed25519"));
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(std::process::Stdio::null())
                .status();
            sh(&format!(
                "ip netns add {ns} && ip link add {veth} type veth peer name {veth}n && \
                 ip link set {veth}n netns {ns} && ip addr add 10.231.{a}.{}/30 dev {veth} && \
                 ip link set {veth} up && ip netns exec {ns} ip addr add {addr}/30 dev {veth}n && \
                 ip netns exec {ns} ip link set {veth}n up && ip netns exec {ns} ip link set lo up",
                b + 1
            ));
            let host = TestHost {
                ns,
                addr,
                veth,
                dir: host_dir,
            };
            hosts.push(host);
        }
        TestHosts {
            hosts,
            key,
            wrong_key,
            fleets: std::sync::Mutex::new(Vec::new()),
            held: std::sync::Mutex::new(Vec::new()),
            _dir: dir,
        }
    }

    /// Lets `public_key` log in as root on every host too.
    pub fn authorize(&self, public_key: &str) {
        for host in &self.hosts {
            let path = host.dir.join("authorized_keys");
            let mut keys = std::fs::read_to_string(&path).unwrap();
            keys.push_str(&format!("{public_key}\n"));
            std::fs::write(&path, keys).unwrap();
        }
    }

    /// Whether a value of type `T` is kept (see [`TestHosts::hold`]).
    pub fn holds<T: 'static>(&self) -> bool {
        self.held.lock().unwrap().iter().any(|h| h.is::<T>())
    }

    /// Keeps `value` until the hosts are dropped; `false` (and `value` dropped) when one of
    /// its type is kept already.
    pub fn hold<T: Send + 'static>(&self, value: T) -> bool {
        let mut held = self.held.lock().unwrap();
        if held.iter().any(|h| h.is::<T>()) {
            return false;
        }
        held.push(Box::new(value));
        true
    }

    /// Records that fleet `name` is deployed to these hosts.
    pub fn track(&self, name: &str) {
        self.fleets.lock().unwrap().push(name.to_string());
    }

    /// A fleet configuration listing every host (as root, with the client key).
    pub fn fleet_yaml(&self, name: &str) -> String {
        self.track(name);
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("    - {}\n", h.addr))
            .collect();
        format!(
            "type: fleet\nname: {name}\nssh_config:\n  user: root\n  identity_file: {}\n  hosts:\n{}",
            self.key.display(),
            hosts.concat()
        )
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        for fleet in self.fleets.lock().unwrap().iter() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("rm -rf {home}/.dstack-rs/{fleet}-*"))
                .status();
        }
        for host in &self.hosts {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "for p in $(ip netns pids {ns}); do kill -9 $p; done; ip netns del {ns}; \
                     ip link del {veth} 2>/dev/null; true",
                    ns = host.ns,
                    veth = host.veth
                ))
                .status();
        }
    }
}

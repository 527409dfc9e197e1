//! A podman Docker-API service on a private socket, and a busybox test image built locally (no
//! registry is reachable). Needs podman, runc and busybox-static (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The test image (a busybox root file system).
pub const IMAGE: &str = "localhost/dstack-test-busybox:latest";

/// A stand-in for dstack's Docker-in-Docker image, under the name `docker: true` runs use
/// (no registry is reachable, and no Docker daemon can be installed here): busybox with a
/// `bash` and a `start-dockerd` that only reports that it ran.
pub const DIND_IMAGE: &str = "docker.io/dstackai/dind:latest";

/// The files of the Docker-in-Docker stand-in besides busybox: `(path, script)`.
const DIND_FILES: [(&str, &str); 2] = [
    ("bin/bash", "#!/bin/sh\nexec /bin/sh \"$@\"\n"),
    (
        "usr/local/bin/start-dockerd",
        "#!/bin/sh\necho dockerd started\ntouch /tmp/dockerd.started\n",
    ),
];

/// A podman API service on a private socket; stopped on drop.
pub struct Podman {
    service: Child,
    /// The API socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Podman {
    /// Starts the service and makes sure the test image exists.
    pub fn start() -> Podman {
        assert!(
            Path::new("/usr/bin/podman").exists(),
            "container tests need podman: apt-get install podman runc busybox-static (as .ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("podman.sock");
        let service = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(socket.exists(), "podman service did not start");
        build_image(&dir.path().join("busybox"), IMAGE, &[]);
        build_image(&dir.path().join("dind"), DIND_IMAGE, &DIND_FILES);
        Podman {
            service,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.service.kill();
        let _ = self.service.wait();
    }
}

/// A busybox root file system with `files` (executable scripts) imported as image `name`
/// (once per machine).
fn build_image(scratch: &Path, name: &str, files: &[(&str, &str)]) {
    let present = Command::new("podman")
        .args(["image", "exists", name])
        .status()
        .unwrap();
    if present.success() {
        return;
    }
    let root = scratch.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "ls", "env", "pwd", "sleep", "id", "printf", "true",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for (path, script) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let tar = scratch.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("podman")
        .arg("import")
        .arg(&tar)
        .arg(name)
        .status()
        .unwrap();
    assert!(status.success(), "podman import");
}

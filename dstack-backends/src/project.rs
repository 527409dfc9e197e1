//! What cloud backends know about the state they work for, kept under `$DSTACK_HOME`: the
//! owner id tagged on every cloud resource (so that strays can be found and nothing else is
//! touched) and the project SSH key pair instances are reached with (`ssh/project_key`, mode
//! 0600 in a 0700 directory). New instances are given a host key of ours at creation
//! ([`HostKey`], in their cloud-init user data), so that the first connection checks a key
//! obtained out of band instead of trusting whatever key answers.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

/// The identity of one `$DSTACK_HOME`.
#[derive(Clone, Debug)]
pub struct Project {
    /// Tagged on every cloud resource as `dstack_owner`.
    pub owner_id: String,
    /// The private key instances accept (OpenSSH format).
    pub ssh_key: PathBuf,
    /// Its public half (`ssh-ed25519 AAAA… dstack`).
    pub ssh_public_key: String,
}

impl Project {
    /// Loads the identity of `home`, creating what is missing.
    pub fn load_or_create(home: &Path) -> io::Result<Project> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(home)?;
        let owner_file = home.join("owner-id");
        let owner_id = read_or_create(&owner_file, || {
            Ok(format!("{}\n", uuid_like(&random_bytes::<16>()?)).into_bytes())
        })?
        .trim()
        .to_string();
        let dir = home.join("ssh");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let ssh_key = dir.join("project_key");
        let text = read_or_create(&ssh_key, || {
            let pair = Ed25519Keypair::from_seed(&random_bytes::<32>()?);
            let mut key = PrivateKey::from(pair);
            key.set_comment("dstack");
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok(text.as_bytes().to_vec())
        })?;
        let private = PrivateKey::from_openssh(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", ssh_key.display()),
            )
        })?;
        fs::set_permissions(&ssh_key, fs::Permissions::from_mode(0o600))?;
        let ssh_public_key = private
            .public_key()
            .to_openssh()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Project {
            owner_id,
            ssh_key,
            ssh_public_key,
        })
    }
}

impl Project {
    /// The tags of a new cloud instance: dstack's (`owner=dstack`, the project, name, user and
    /// fleet, this home's owner id, the state's identity, the engine's instance id, the
    /// creation attempt's id, and the address it is reached at when mapped), then `backend`
    /// tags, then the configuration's — earlier sources win.
    pub fn instance_tags(
        &self,
        project_name: &str,
        config: &dstack_core::backend::InstanceConfig,
        address: Option<&str>,
        backend: &std::collections::BTreeMap<String, String>,
    ) -> std::collections::BTreeMap<String, String> {
        let user = std::env::var("USER").unwrap_or_else(|_| "dstack".to_string());
        let mut tags = std::collections::BTreeMap::new();
        let base = [
            ("owner", "dstack"),
            ("dstack_project", project_name),
            ("dstack_name", config.name.as_str()),
            ("dstack_user", user.as_str()),
            ("dstack_fleet", config.fleet.as_str()),
            ("dstack_owner", self.owner_id.as_str()),
            ("dstack_state", config.state_id.as_str()),
            ("dstack_instance_id", config.instance_id.as_str()),
            ("dstack_attempt", config.attempt_id.as_str()),
        ];
        for (k, v) in base {
            tags.insert(k.to_string(), v.to_string());
        }
        if let Some(address) = address {
            tags.insert("dstack_address".to_string(), address.to_string());
        }
        for (k, v) in backend.iter().chain(config.tags.iter()) {
            tags.entry(k.clone()).or_insert_with(|| v.clone());
        }
        tags
    }
}

/// A host key made for one new instance: cloud-init installs it as the instance's only SSH
/// host key ([`Project::user_data`]), and the engine pins its public half before it first
/// connects. The private half lives in memory and in the instance's user data only.
pub struct HostKey {
    private: zeroize::Zeroizing<String>,
    public: String,
}

impl HostKey {
    /// A new ed25519 host key.
    pub fn generate() -> io::Result<HostKey> {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&random_bytes::<32>()?));
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(HostKey { private, public })
    }

    /// The public half (`ssh-ed25519 AAAA…`), as a known-hosts line holds it.
    pub fn public(&self) -> &str {
        &self.public
    }
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Project {
    /// The cloud-init user data of a new instance: the project's key authorized for the
    /// image's user, and `host_key` as the only SSH host key (cloud-init's `ssh_keys`; the
    /// image's own keys deleted and no others generated). Ubuntu's sshd starts after
    /// cloud-init wrote the keys, so it never answers with another key.
    pub fn user_data(&self, host_key: &HostKey) -> String {
        let private: String = host_key
            .private
            .lines()
            .map(|line| format!("    {line}\n"))
            .collect();
        format!(
            "#cloud-config\nssh_authorized_keys:\n  - {}\nssh_deletekeys: true\n\
             ssh_genkeytypes: []\nssh_keys:\n  ed25519_private: |\n{private}  \
             ed25519_public: {}\n",
            self.ssh_public_key, host_key.public
        )
    }
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn uuid_like(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The text of `path`, creating it from `make` if it is missing (or empty, as a write cut
/// short before files were linked into place left it): of two processes creating it at once
/// one wins and both read what it wrote.
fn read_or_create(path: &Path, make: impl FnOnce() -> io::Result<Vec<u8>>) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text),
        Ok(_) => dstack_core::files::replace_private(path, &make()?)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            dstack_core::files::create_private(path, &make()?)?;
        }
        Err(e) => return Err(e),
    }
    fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_created_once_and_kept_private() {
        let home = tempfile::tempdir().unwrap();
        let a = Project::load_or_create(home.path()).unwrap();
        let b = Project::load_or_create(home.path()).unwrap();
        assert_eq!(a.owner_id, b.owner_id);
        assert_eq!(a.ssh_public_key, b.ssh_public_key);
        assert!(a.ssh_public_key.starts_with("ssh-ed25519 "));
        let mode = fs::metadata(&a.ssh_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir = fs::metadata(home.path().join("ssh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir, 0o700);
    }

    #[test]
    fn processes_creating_the_identity_at_once_end_with_one() {
        let home = tempfile::tempdir().unwrap();
        let made: Vec<Project> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Project::load_or_create(home.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for p in &made {
            assert_eq!(p.owner_id, made[0].owner_id);
            assert_eq!(p.ssh_public_key, made[0].ssh_public_key);
        }
        // Nothing temporary is left behind.
        let left: Vec<_> = fs::read_dir(home.path().join("ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("project_key")]);
    }

    #[test]
    fn user_data_gives_the_instance_its_host_key_and_nothing_else() {
        let home = tempfile::tempdir().unwrap();
        let project = Project::load_or_create(home.path()).unwrap();
        let key = HostKey::generate().unwrap();
        let other = HostKey::generate().unwrap();
        assert_ne!(key.public(), other.public());
        let text = project.user_data(&key);
        assert!(text.starts_with("#cloud-config\n"));
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
        let config = &docs[0];
        assert_eq!(
            config["ssh_authorized_keys"][0].as_str(),
            Some(project.ssh_public_key.as_str())
        );
        assert_eq!(config["ssh_deletekeys"].as_bool(), Some(true));
        assert!(config["ssh_genkeytypes"].as_vec().unwrap().is_empty());
        // The private half cloud-init installs is the key whose public half is pinned.
        let private = config["ssh_keys"]["ed25519_private"].as_str().unwrap();
        let parsed = PrivateKey::from_openssh(private).unwrap();
        assert_eq!(parsed.public_key().to_openssh().unwrap(), key.public());
        assert_eq!(
            config["ssh_keys"]["ed25519_public"].as_str(),
            Some(key.public())
        );
        // Printing a host key shows its public half only.
        let shown = format!("{key:?}");
        assert!(shown.contains(key.public()) && !shown.contains("PRIVATE"));
    }
}

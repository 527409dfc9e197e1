//! The links that open a dev environment in a desktop IDE over SSH (`ide:` of a
//! `dev-environment`), through the `ssh <run>` entry of its first job.

use crate::config::run::Ide;

/// The link that opens `working_dir` on SSH host `host` in `ide` (`version` is not part of
/// any of these links: the IDE installs its own server over SSH).
pub fn link(ide: Ide, host: &str, working_dir: &str) -> String {
    let dir = if working_dir.starts_with('/') {
        working_dir.to_string()
    } else {
        format!("/{working_dir}")
    };
    match ide {
        Ide::VsCode => format!("vscode://vscode-remote/ssh-remote+{host}{dir}"),
        Ide::Cursor => format!("cursor://vscode-remote/ssh-remote+{host}{dir}"),
        Ide::Windsurf => format!("windsurf://vscode-remote/ssh-remote+{host}{dir}"),
        Ide::Zed => format!("zed://ssh/{host}{dir}"),
    }
}

/// The IDE's name, for humans.
pub fn name(ide: Ide) -> &'static str {
    match ide {
        Ide::VsCode => "VS Code",
        Ide::Cursor => "Cursor",
        Ide::Windsurf => "Windsurf",
        Ide::Zed => "Zed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_host_and_directory() {
        assert_eq!(
            link(Ide::VsCode, "dev", "/home/me/proj"),
            "vscode://vscode-remote/ssh-remote+dev/home/me/proj"
        );
        assert_eq!(
            link(Ide::Cursor, "dev", "/w"),
            "cursor://vscode-remote/ssh-remote+dev/w"
        );
        assert_eq!(
            link(Ide::Windsurf, "dev", ""),
            "windsurf://vscode-remote/ssh-remote+dev/"
        );
        assert_eq!(link(Ide::Zed, "dev", "/w"), "zed://ssh/dev/w");
    }
}

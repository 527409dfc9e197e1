//! `${{ namespace.name }}` references in configuration values, with dstack's grammar: the
//! inner name is trimmed and is `namespace.key` (exactly one dot, each part a letter or `_`
//! then letters, digits or `_`), or a `groups[i].nodes|replicas[j].IP_ADDRESS` reference;
//! `$${{` is a literal `${{`. Which namespaces are resolved where is the caller's decision
//! (`secrets.*` when a job is handed to its agent, `env.*` in `registry_auth` from the
//! client's environment); references the caller leaves alone stay as written.

/// What to do with one reference.
pub enum Lookup {
    /// Replace it with this text.
    Value(String),
    /// Leave it as written (resolved elsewhere, or later).
    Keep,
    /// It names nothing: an error, listed with the other missing names.
    Missing,
}

/// A value whose references cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolationError {
    /// `${{` without a closing `}}`.
    #[error("unclosed reference at character {0}: expected `}}}}`")]
    Unclosed(usize),
    /// A reference whose name is not `namespace.name`.
    #[error("illegal reference name `{0}`")]
    IllegalName(String),
    /// References to names that do not exist.
    #[error("missing {}", .0.join(", "))]
    Missing(Vec<String>),
}

/// Replaces the references of `text` as `lookup(namespace, name)` says. Only names that
/// pass the grammar reach `lookup`; `groups[…]` references are kept.
pub fn interpolate(
    text: &str,
    mut lookup: impl FnMut(&str, &str) -> Lookup,
) -> Result<String, InterpolationError> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(at) = rest.find("${{") {
        let escaped = at > 0 && rest.as_bytes()[at - 1] == b'$';
        if escaped {
            out.push_str(&rest[..at - 1]);
            out.push_str("${{");
            rest = &rest[at + 3..];
            offset += at + 3;
            continue;
        }
        out.push_str(&rest[..at]);
        let inner_start = at + 3;
        let Some(close) = rest[inner_start..].find("}}") else {
            return Err(InterpolationError::Unclosed(offset + at));
        };
        let raw = &rest[at..inner_start + close + 2];
        let name = rest[inner_start..inner_start + close].trim();
        match split_name(name) {
            Some(Name::Plain(namespace, key)) => match lookup(namespace, key) {
                Lookup::Value(value) => out.push_str(&value),
                Lookup::Keep => out.push_str(raw),
                Lookup::Missing => missing.push(name.to_string()),
            },
            Some(Name::Groups) => out.push_str(raw),
            None => return Err(InterpolationError::IllegalName(name.to_string())),
        }
        rest = &rest[inner_start + close + 2..];
        offset += inner_start + close + 2;
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(InterpolationError::Missing(missing))
    }
}

/// Whether `text` holds only references (and blanks): nothing written in clear.
pub fn only_references(text: &str) -> bool {
    text.contains("${{")
        && interpolate(text, |_, _| Lookup::Value(String::new()))
            .is_ok_and(|rest| rest.trim().is_empty())
}

/// The names `text` refers to as `${{ env.NAME }}`.
pub fn env_references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let _ = interpolate(text, |namespace, name| {
        if namespace == "env" {
            names.push(name.to_string());
        }
        Lookup::Keep
    });
    names
}

enum Name<'a> {
    Plain(&'a str, &'a str),
    Groups,
}

fn split_name(name: &str) -> Option<Name<'_>> {
    if is_groups_reference(name) {
        return Some(Name::Groups);
    }
    let (namespace, key) = name.split_once('.')?;
    (is_identifier(namespace) && is_identifier(key)).then_some(Name::Plain(namespace, key))
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a reference's namespace or name, a secret's name, a name a
/// shell assigns.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `groups[i].nodes[j].IP_ADDRESS` or `groups[i].replicas[j].IP_ADDRESS`.
fn is_groups_reference(name: &str) -> bool {
    let index = |s: &str| -> Option<usize> {
        let digits = s.strip_prefix('[')?.split(']').next()?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then_some(digits.len() + 2)
    };
    let Some(rest) = name.strip_prefix("groups") else {
        return false;
    };
    let Some(n) = index(rest) else { return false };
    let rest = &rest[n..];
    let Some(rest) = rest
        .strip_prefix(".nodes")
        .or_else(|| rest.strip_prefix(".replicas"))
    else {
        return false;
    };
    let Some(n) = index(rest) else { return false };
    &rest[n..] == ".IP_ADDRESS"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dstack's own vectors: `run.args = "qwerty"`, `secrets` skipped.
    fn dstack_like(text: &str) -> Result<String, InterpolationError> {
        interpolate(text, |namespace, name| match (namespace, name) {
            ("run", "args") => Lookup::Value("qwerty".into()),
            ("secrets", _) => Lookup::Keep,
            _ => Lookup::Missing,
        })
    }

    #[test]
    fn dstack_vectors() {
        assert_eq!(dstack_like("").unwrap(), "");
        assert_eq!(dstack_like("${ENV}").unwrap(), "${ENV}");
        assert_eq!(dstack_like("$${{ENV}}").unwrap(), "${{ENV}}");
        assert_eq!(dstack_like("echo $${{ENV}}").unwrap(), "echo ${{ENV}}");
        assert_eq!(dstack_like("${{ run.args }}").unwrap(), "qwerty");
        assert_eq!(
            dstack_like("${{ secrets.password  }}").unwrap(),
            "${{ secrets.password  }}"
        );
        assert_eq!(
            dstack_like("${{ env.name }}"),
            Err(InterpolationError::Missing(vec!["env.name".into()]))
        );
        assert!(matches!(
            dstack_like("${{ secrets.password }"),
            Err(InterpolationError::Unclosed(0))
        ));
        for illegal in [
            "secrets.pass-word",
            ".password",
            "password.",
            "secrets.password.hash",
            "secrets.007",
            "groups[0].nodes[0].IP",
            "groups[0].node[0].IP_ADDRESS",
            "groups.prefill.nodes[0].IP_ADDRESS",
        ] {
            assert_eq!(
                dstack_like(&format!("${{{{ {illegal} }}}}")),
                Err(InterpolationError::IllegalName(illegal.into())),
                "{illegal}"
            );
        }
        for kept in [
            "${{ groups[0].nodes[0].IP_ADDRESS }}",
            "${{groups[2].replicas[10].IP_ADDRESS}}",
        ] {
            assert_eq!(dstack_like(kept).unwrap(), kept);
        }
    }

    #[test]
    fn several_references_and_text_around_them() {
        let out = interpolate("a ${{ x.one }}-${{x.two}} b", |_, name| {
            Lookup::Value(name.to_uppercase())
        })
        .unwrap();
        assert_eq!(out, "a ONE-TWO b");
        assert_eq!(
            interpolate("${{ x.a }} ${{ x.b }}", |_, _| Lookup::Missing),
            Err(InterpolationError::Missing(vec![
                "x.a".into(),
                "x.b".into()
            ]))
        );
    }

    #[test]
    fn only_references_tells_literal_text_apart() {
        assert!(only_references("${{ secrets.token }}"));
        assert!(only_references(" ${{ env.A }}${{ secrets.B }} "));
        assert!(!only_references("hunter2"));
        assert!(!only_references("x${{ secrets.token }}"));
        assert!(!only_references("$${{ secrets.token }}"));
        assert!(!only_references(""));
        assert!(!only_references("${{ hunter2"));
    }
}

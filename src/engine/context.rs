//! The build context: which files a COPY names, as BuildKit sees them — paths relative to the
//! context root, wildcards per path component, `.dockerignore` applied, nothing outside the root.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::dockerfile::dockerignore::Dockerignore;
use crate::sandbox::CopyItem;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{0}: forbidden path outside the build context")]
    Outside(String),
    #[error(
        "{0}: not found in the build context {1} (check the path, and that .dockerignore does not exclude it)"
    )]
    NotFound(String, String),
    #[error("reading the build context at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Context {
    root: PathBuf,
    ignore: Option<Dockerignore>,
}

impl Context {
    pub fn new(root: PathBuf, ignore: Option<Dockerignore>) -> Context {
        Context { root, ignore }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn excluded(&self, rel: &str) -> bool {
        self.ignore.as_ref().is_some_and(|i| i.is_excluded(rel))
    }

    /// The context-relative paths a COPY source (possibly with wildcards) names, sorted.
    pub fn matches(&self, source: &str) -> Result<Vec<String>, ContextError> {
        let clean = clean_relative(source).ok_or_else(|| ContextError::Outside(source.into()))?;
        if clean.is_empty() {
            return Ok(vec![String::new()]);
        }
        let parts: Vec<&str> = clean.split('/').collect();
        let mut found = vec![String::new()];
        for part in parts {
            let mut next = Vec::new();
            for base in &found {
                let dir = self.root.join(base);
                if has_wildcard(part) {
                    let Ok(entries) = fs::read_dir(&dir) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if glob_match(part, &name) {
                            next.push(join_rel(base, &name));
                        }
                    }
                } else if fs::symlink_metadata(dir.join(part)).is_ok() {
                    next.push(join_rel(base, part));
                }
            }
            found = next;
        }
        found.retain(|rel| !self.excluded(rel));
        found.sort();
        if found.is_empty() {
            return Err(ContextError::NotFound(
                source.into(),
                self.root.display().to_string(),
            ));
        }
        Ok(found)
    }

    /// The copy items for one matched source: a file (or a symlink, followed at the top level as
    /// BuildKit does), or a directory and everything below it that `.dockerignore` keeps.
    pub fn items(&self, rel: &str, out: &mut Vec<CopyItem>) -> Result<(), ContextError> {
        let path = self.root.join(rel);
        let real = self.follow_top(&path, rel)?;
        let meta = fs::metadata(&real).map_err(|source| ContextError::Io {
            path: real.clone(),
            source,
        })?;
        if meta.is_dir() {
            out.push(CopyItem {
                src: real.clone(),
                rel: PathBuf::new(),
            });
            self.walk(&real, rel, Path::new(""), out)
        } else {
            let name = Path::new(rel)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_default();
            out.push(CopyItem {
                src: real,
                rel: name,
            });
            Ok(())
        }
    }

    fn follow_top(&self, path: &Path, rel: &str) -> Result<PathBuf, ContextError> {
        let is_link = fs::symlink_metadata(path)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if !is_link {
            return Ok(path.to_path_buf());
        }
        let real = fs::canonicalize(path)
            .map_err(|_| ContextError::NotFound(rel.into(), self.root.display().to_string()))?;
        let root = fs::canonicalize(&self.root).map_err(|source| ContextError::Io {
            path: self.root.clone(),
            source,
        })?;
        if !real.starts_with(&root) {
            return Err(ContextError::Outside(rel.into()));
        }
        Ok(real)
    }

    fn walk(
        &self,
        dir: &Path,
        ctx_rel: &str,
        item_rel: &Path,
        out: &mut Vec<CopyItem>,
    ) -> Result<(), ContextError> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(|source| ContextError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        let keeps_exceptions = self.ignore.as_ref().is_some_and(|i| i.has_exceptions());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let child_ctx = join_rel(ctx_rel, &name);
            let child_item = item_rel.join(&name);
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if self.excluded(&child_ctx) {
                // An exception (`!pattern`) may re-include something below an excluded dir.
                if is_dir && keeps_exceptions {
                    let mut below = Vec::new();
                    self.walk(&e.path(), &child_ctx, &child_item, &mut below)?;
                    if !below.is_empty() {
                        out.push(CopyItem {
                            src: e.path(),
                            rel: child_item,
                        });
                        out.extend(below);
                    }
                }
                continue;
            }
            out.push(CopyItem {
                src: e.path(),
                rel: child_item.clone(),
            });
            if is_dir {
                self.walk(&e.path(), &child_ctx, &child_item, out)?;
            }
        }
        Ok(())
    }
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

/// `a/./b/../c` -> `a/c`, leading `/` dropped; `None` when it climbs out of the root.
pub fn clean_relative(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Go's `filepath.Match` for one path component: `*`, `?`, `[a-z]`, `[^x]`, `\` escapes.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob_at(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(c) = n.first() else { return false };
            let Some(end) = p.iter().skip(1).position(|&ch| ch == ']').map(|i| i + 1) else {
                return false;
            };
            let mut class = &p[1..end];
            let negate = matches!(class.first(), Some('^') | Some('!'));
            if negate {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= *c && *c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == *c;
                    i += 1;
                }
            }
            hit != negate && glob_at(&p[end + 1..], &n[1..])
        }
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && glob_at(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && glob_at(&p[1..], &n[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_go_filepath_match() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("file?", "file1"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[^a-c]x", "bx"));
        assert!(glob_match("\\*", "*"));
    }

    #[test]
    fn paths_are_cleaned_and_confined() {
        assert_eq!(clean_relative("/a/./b/../c").as_deref(), Some("a/c"));
        assert_eq!(clean_relative(".").as_deref(), Some(""));
        assert_eq!(clean_relative("../x"), None);
        assert_eq!(clean_relative("a/../../x"), None);
    }

    #[test]
    fn sources_match_and_walk_with_dockerignore() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/sub")).unwrap();
        fs::write(root.join("src/a.txt"), "a").unwrap();
        fs::write(root.join("src/b.log"), "b").unwrap();
        fs::write(root.join("src/sub/c.txt"), "c").unwrap();
        fs::write(root.join("top.txt"), "t").unwrap();
        let ignore = Dockerignore::parse("**/*.log\n").unwrap();
        let ctx = Context::new(root.to_path_buf(), Some(ignore));
        assert_eq!(ctx.matches("*.txt").unwrap(), vec!["top.txt"]);
        assert_eq!(ctx.matches("src/*").unwrap(), vec!["src/a.txt", "src/sub"]);
        assert!(matches!(
            ctx.matches("src/b.log"),
            Err(ContextError::NotFound(..))
        ));
        assert!(matches!(
            ctx.matches("../etc"),
            Err(ContextError::Outside(_))
        ));
        let mut items = Vec::new();
        ctx.items("src", &mut items).unwrap();
        let rels: Vec<_> = items.iter().map(|i| i.rel.display().to_string()).collect();
        assert_eq!(rels, vec!["", "a.txt", "sub", "sub/c.txt"]);
    }
}

//! Image references (`[host[:port]/]path[:tag][@digest]`), parsed by hand.
//!
//! The grammar is the one docker uses, from distribution/reference (`reference.go`,
//! `normalize.go`'s `ParseNormalizedNamed`):
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path ( "/" path )*
//! domain     := label ( "." label )* [ ":" [0-9]+ ]
//! label      := [A-Za-z0-9] | [A-Za-z0-9] [A-Za-z0-9-]* [A-Za-z0-9]
//! path       := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest     := algorithm ":" hex      sha256 (64), sha384 (96) or sha512 (128) lowercase hex
//! ```
//!
//! and normalised as docker does: a name whose first component is not a host (no `.` or `:`,
//! not `localhost`, all lower case) is on `docker.io`; `index.docker.io` is `docker.io`; a
//! one-component name on `docker.io` gets `library/`; without tag or digest the tag is `latest`;
//! the repository (after `library/`) is at most 255 characters.
//!
//! Why by hand: `oci_client::Reference`'s `FromStr` matches one large regular expression, and
//! building that regex (the `regex` crate compiles it on first use, in every process) cost about
//! 40 ms of CPU, 35 % of a fully cached build of a small image (`perf record` of a warm `tiny`
//! bench build: 84 of its 164 samples in `regex_automata`'s compiler). This parser does the same
//! in microseconds, builds the [`Reference`] with its constructors (`with_tag`, `with_digest`,
//! `with_tag_and_digest`, which only fill fields), and says where a reference is wrong.
//!
//! It accepts exactly what `oci_client::Reference::from_str` accepts, with the same registry,
//! repository, tag and digest (a differential test here and the `reference` fuzz target check
//! that), except for four inputs where oci-client departs from docker, and this parser follows
//! docker:
//!
//! 1. a first component with an upper-case letter (`Foo/bar`) names a registry host, as in
//!    docker (oci-client puts it on docker.io as the repository `Foo/bar`, which no registry
//!    accepts);
//! 2. a bare 64-character lower-case hexadecimal string is an image ID, not a name (docker:
//!    "cannot specify 64-byte hexadecimal strings");
//! 3. a tag is ASCII (oci-client's regex reads `\w` as Unicode, Go's and the distribution
//!    spec's is ASCII);
//! 4. a digest's hex is lower case (go-digest's rule; oci-client takes `[[:xdigit:]]`).
//!
//! IPv6 literal hosts (`[::1]:5000/x`), which newer docker accepts, are refused, as oci-client
//! refuses them.

use oci_client::Reference;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
/// Longest repository (path, after `library/`), as distribution's `NameTotalLengthMax`.
pub const NAME_MAX: usize = 255;
/// Longest tag.
pub const TAG_MAX: usize = 128;

/// A reference that does not parse: the input, the column (1-based, in characters) where the
/// faulty part starts, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid image reference {input:?}: {problem} (at column {column}); expected [host[:port]/]name[:tag][@digest]"
)]
pub struct ReferenceError {
    pub input: String,
    pub column: usize,
    pub problem: Problem,
}

/// What is wrong with a reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("it is empty")]
    Empty,
    #[error(
        "a 64-character hexadecimal string is an image ID, not a name; name the image, or pin it as name@sha256:<hex>"
    )]
    ImageId,
    #[error("the name is empty")]
    NameEmpty,
    #[error("path component {0:?} is empty (two '/' in a row, or a '/' at an end)")]
    EmptyComponent(String),
    #[error("repository name {0:?} must be lower case")]
    Uppercase(String),
    #[error(
        "path component {0:?} is not valid: lower-case letters and digits, separated by '.', '_', '__' or '-'s, starting and ending with a letter or digit"
    )]
    BadComponent(String),
    #[error(
        "registry host {0:?} is not valid: host name labels of letters, digits and '-' separated by '.', then optionally ':' and a port number"
    )]
    BadDomain(String),
    #[error(
        "tag {0:?} is not valid: 1 to 128 ASCII letters, digits, '_', '.' or '-', not starting with '.' or '-'"
    )]
    BadTag(String),
    #[error(
        "digest {0:?} is not valid: expected algorithm:hex, such as sha256:<64 lower-case hex digits>"
    )]
    BadDigest(String),
    #[error("digest algorithm {0:?} is not supported: use sha256, sha384 or sha512")]
    DigestUnsupported(String),
    #[error("digest {0:?} has the wrong length: sha256 takes 64 hex digits, sha384 96, sha512 128")]
    DigestLength(String),
    #[error("repository name is {0} characters long, at most {NAME_MAX} are allowed")]
    NameTooLong(usize),
}

/// Parses an image reference as docker does (see the module documentation).
pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
    let fail = |at: usize, problem: Problem| ReferenceError {
        input: input.to_string(),
        column: input.get(..at).map_or(at, |s| s.chars().count()) + 1,
        problem,
    };
    if input.is_empty() {
        return Err(fail(0, Problem::Empty));
    }
    if input.len() == 64
        && input
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(fail(0, Problem::ImageId));
    }

    // The digest follows the only '@'; the tag follows a ':' after the last '/' (a ':' before
    // it can only be the registry's port).
    let (rest, digest) = match input.find('@') {
        Some(at) => (&input[..at], Some((at + 1, &input[at + 1..]))),
        None => (input, None),
    };
    let last_slash = rest.rfind('/');
    let (name, tag) = match rest.rfind(':') {
        Some(colon) if last_slash.is_none_or(|s| colon > s) => {
            (&rest[..colon], Some((colon + 1, &rest[colon + 1..])))
        }
        _ => (rest, None),
    };

    if name.is_empty() {
        return Err(fail(0, Problem::NameEmpty));
    }
    let (domain, remote) = split_name(name).map_err(|(at, p)| fail(at, p))?;

    if let Some((at, tag)) = tag
        && !valid_tag(tag)
    {
        return Err(fail(at, Problem::BadTag(tag.to_string())));
    }
    if let Some((at, digest)) = digest {
        check_digest(digest).map_err(|p| fail(at, p))?;
    }

    let repository = if domain == DOCKER_HUB && !remote.contains('/') {
        format!("{OFFICIAL_PREFIX}{remote}")
    } else {
        remote.to_string()
    };
    if repository.len() > NAME_MAX {
        return Err(fail(0, Problem::NameTooLong(repository.len())));
    }
    let domain = domain.to_string();
    Ok(match (tag, digest) {
        (Some((_, t)), Some((_, d))) => {
            Reference::with_tag_and_digest(domain, repository, t.into(), d.into())
        }
        (None, Some((_, d))) => Reference::with_digest(domain, repository, d.into()),
        (Some((_, t)), None) => Reference::with_tag(domain, repository, t.into()),
        (None, None) => Reference::with_tag(domain, repository, DEFAULT_TAG.into()),
    })
}

/// Splits and checks a name: the registry host (docker.io if none) and the remote path, as
/// docker's `splitDockerDomain`. Errors carry the byte offset in `name` (= in the input).
fn split_name(name: &str) -> Result<(&str, &str), (usize, Problem)> {
    let Some((first, remote)) = name.split_once('/') else {
        check_path(name, 0)?;
        return Ok((DOCKER_HUB, name));
    };
    // Valid if the whole name is a path, or the first component a host and the rest a path
    // (`a.b_c/d` is both a path and, to docker, on the host `a.b_c`).
    let as_path = check_path(name, 0);
    let as_host = if valid_domain(first) {
        check_path(remote, first.len() + 1)
    } else {
        Err((0, Problem::BadDomain(first.to_string())))
    };
    let is_host = first == "localhost"
        || first.contains(['.', ':'])
        || first.bytes().any(|b| b.is_ascii_uppercase());
    match (as_path, as_host) {
        (Err(e), Err(_)) if !is_host => return Err(e),
        (Err(_), Err(e)) => return Err(e),
        _ => {}
    }
    Ok(match (is_host, first == DOCKER_HUB_LEGACY) {
        (true, true) => (DOCKER_HUB, remote),
        (true, false) => (first, remote),
        (false, _) => (DOCKER_HUB, name),
    })
}

/// Checks the '/'-separated path components starting at byte `offset` of the input.
fn check_path(path: &str, offset: usize) -> Result<(), (usize, Problem)> {
    let mut at = offset;
    for component in path.split('/') {
        if component.is_empty() {
            return Err((at, Problem::EmptyComponent(component.to_string())));
        }
        if !valid_component(component) {
            let problem = if valid_component(&component.to_ascii_lowercase()) {
                Problem::Uppercase(path.to_string())
            } else {
                Problem::BadComponent(component.to_string())
            };
            return Err((at, problem));
        }
        at += component.len() + 1;
    }
    Ok(())
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !b.first().is_some_and(|&x| alnum(x)) || !b.last().is_some_and(|&x| alnum(x)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run, between two alphanumerics (the ends are alphanumeric).
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `label ( "." label )* [ ":" [0-9]+ ]`, labels `[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    host.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    })
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)* ":" hex`, then the algorithm's rules.
fn check_digest(d: &str) -> Result<(), Problem> {
    let bad = || Problem::BadDigest(d.to_string());
    let (algorithm, hex) = d.split_once(':').ok_or_else(bad)?;
    let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(Problem::DigestUnsupported(algorithm.to_string())),
    };
    if hex.len() != want {
        return Err(Problem::DigestLength(d.to_string()));
    }
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    Ok(())
}

/// How an input on which this parser and `oci_client::Reference::from_str` disagree is one of
/// the four documented departures (see the module documentation); `None` if it is not one.
/// Used by the differential test and the `reference` fuzz target.
#[doc(hidden)]
pub fn departure(
    input: &str,
    ours: &Result<Reference, ReferenceError>,
    theirs: &Result<Reference, oci_client::ParseError>,
) -> Option<&'static str> {
    match (ours, theirs) {
        (Ok(a), _) => {
            let first = input.split_once('/')?.0;
            let upper_host = first.bytes().any(|x| x.is_ascii_uppercase())
                && !first.contains(['.', ':'])
                && a.registry() == first;
            // oci-client keeps the host in the repository, on docker.io, which may make it
            // longer than the limit.
            let theirs_same = match theirs {
                Ok(b) => {
                    b.registry() == DOCKER_HUB
                        && b.repository() == format!("{first}/{}", a.repository())
                        && a.tag() == b.tag()
                        && a.digest() == b.digest()
                }
                Err(e) => {
                    *e == oci_client::ParseError::NameTooLong
                        && first.len() + 1 + a.repository().len() > NAME_MAX
                }
            };
            (upper_host && theirs_same).then_some("upper-case first component is a registry host")
        }
        (Err(e), Ok(_)) => match &e.problem {
            Problem::ImageId => Some("64-hex image ID"),
            Problem::BadTag(t) if !t.is_ascii() => Some("non-ASCII tag"),
            Problem::BadDigest(d) if d.bytes().any(|b| b.is_ascii_uppercase()) => {
                Some("upper-case digest hex")
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    /// Inputs from distribution/reference's `reference_test.go` and `normalize_test.go`, from
    /// oci-spec's own tests, and edge cases of each rule of the grammar.
    fn corpus() -> Vec<String> {
        let hex64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a";
        let sha512 = format!("sha512:{}", "f".repeat(128));
        let sha384 = format!("sha384:{}", "a".repeat(96));
        let mut v: Vec<String> = [
            // reference_test.go TestReferenceParse
            "test_com",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "",
            ":justtag",
            "repo@sha256:ffffffffffffffffffffffffffffffffff",
            "validname@invaliddigest:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "Uppercase:tag",
            "Uppercase/lowercase:tag",
            "test:5000/Uppercase/lowercase:tag",
            "lowercase:Uppercase",
            "aa/asdf$$^/aa",
            "sub-dom1.foo.com/bar/baz/quux",
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "xn--n3h.com/myimage:xn--n3h.com",
            "foo_bar.com:8080",
            "foo/foo_bar.com:8080",
            "192.168.1.1",
            "192.168.1.1:tag",
            "192.168.1.1:5000",
            "192.168.1.1/repo",
            "192.168.1.1:5000/repo",
            "192.168.1.1:5000/repo:5050",
            "[2001:db8::1]",
            "[2001:db8::1]:5000",
            "[2001:db8::1]:tag",
            "[2001:db8::1]/repo",
            "[2001:db8::1]:5000/repo:tag",
            "[::1]:5000/repo",
            "[fe80::1%eth0]:5000/repo",
            "[fe80::1%@invalidzone]:5000/repo",
            // normalize_test.go
            "docker/docker",
            "library/debian",
            "debian",
            "docker.io/docker/docker",
            "docker.io/library/debian",
            "docker.io/debian",
            "index.docker.io/docker/docker",
            "index.docker.io/library/debian",
            "index.docker.io/debian",
            "127.0.0.1:5000/docker/docker",
            "127.0.0.1:5000/library/debian",
            "127.0.0.1:5000/debian",
            "192.168.0.1",
            "192.168.0.1:80",
            "192.168.0.1:8/debian",
            "192.168.0.2:25000/debian",
            "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
            "Docker/docker",
            "DOCKER/docker",
            "https://github.com/docker/docker",
            "docker/Docker",
            "-docker",
            "-docker/docker",
            "-docker.io/docker/docker",
            "docker///docker",
            "docker.io/docker/Docker",
            "docker.io/docker///docker",
            "fc00::1:5000/debian",
            "docker-rules/docker",
            "docker---rules/docker",
            "doc/docker",
            "d/docker",
            "jess/t",
            "dock__er/docker",
            "docker-/docker",
            "-docker-/docker",
            "____/____",
            "_docker/_docker",
            "dock..er/docker",
            "dock_.er/docker",
            "dock-.er/docker",
            "docker/",
            "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
            "fooo/bar",
            "library/ubuntu",
            "nonlibrary/ubuntu",
            "other/library",
            "127.0.0.1:8000/private/moonbase",
            "example.com/private/moonbase",
            "example.com:8000/privatebasee",
            "ubuntu-12.04-base",
            "library/foo/bar",
            "store/foo/bar",
            "Foo/bar",
            "FOO/bar",
            "redis:latest",
            "dmcgowan/myapp@sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c",
            "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c",
            "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
            "dbcc1",
            "test-com:8080/foo",
            "xn--n3h.com:18080/foo",
            "busybox:latest@sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa",
            // oci-spec's tests
            "busybox",
            "opensuse/leap:15.3",
            "localhost/foo",
            "localhost:5000/foo:bar",
            "LOCALHOST/foo",
            "localhost",
            // edge cases
            "a",
            "a/b/c/d/e",
            "a:",
            "a@",
            "a:@",
            "/a",
            "a/",
            "a//b",
            ":",
            "@",
            "a:b:c",
            "a:5/b:c",
            "a:b/c",
            "a:/b",
            "a.:5/b",
            ".a/b",
            "a-/b",
            "a-.b/c",
            "a..b/c",
            "a-b.c/d",
            "A.b/c",
            "a.B.c:1/d/e:Tag_1.x-y",
            "a_b/c",
            "a__b",
            "a___b",
            "a._b",
            "a-_b",
            "a--b",
            "a.b.c",
            "a:.tag",
            "a:-tag",
            "a:_tag",
            "a:ta/g",
            "a:tag@",
            "a:tag@sha256",
            "a:tag@sha256:",
            "a@sha256:abc",
            "a@sha256:FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
            "a@sha256:gfffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "a@sha2-56:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "a@sha256+b64:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "a@1sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "a@sha256:ffffffffffffffffffffffffffffffff",
            "a@md5:ffffffffffffffffffffffffffffffff",
            "a@b@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "a:tagé",
            "é",
            "a:t\u{0301}",
            "a:٣",
            "a\n",
            " a",
            "a b",
            "a\0",
            "a:5000",
            "host:/x",
            "host:x/y",
            "host:123456789012345678901234567890/y",
            "h_st.com/y",
            "a.b_c/d",
            "a.b__c:5/d",
            "h-.com/y",
            "-h.com/y",
            "h.com./y",
            "ho.com:80:90/y",
            "127.0.0.1:5055/base/busybox:1",
            "127.0.0.1:5055/base/busybox@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "index.docker.io/foo",
            "index.docker.io/foo/bar",
            "docker.io",
            "docker.io/",
            "Docker.io/foo",
            "docker.IO/foo",
            "LOCALHOST:5000/foo",
            "fOO/bar/baz:X",
            "Foo",
            "Foo:tag",
            "Foo_/bar",
            "Fo-o/bar",
            "F/b/c@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            hex64,
            &format!("{hex64}:tag"),
            &format!("docker.io/{hex64}"),
            &hex64.to_uppercase(),
            &hex64[..63],
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for base in [
            "test:5000/repo",
            "xn--7o8h.com/myimage:xn--7o8h.com",
            "a",
            "a:t",
        ] {
            v.push(format!("{base}@{SHA256}"));
            v.push(format!("{base}@{sha512}"));
            v.push(format!("{base}@{sha384}"));
            v.push(format!("{base}@{}", &sha384[..sha384.len() - 1]));
            v.push(format!("{base}@sha512:{}", "f".repeat(64)));
        }
        v.push(format!("@{SHA256}"));
        // Lengths around the limits: repository 255/256 (with and without library/), tag 128/129.
        v.push(format!("{}a:tag", "a/".repeat(127)));
        v.push(format!("{}a:tag", "a/".repeat(128)));
        v.push(format!("{}a:tag-puts-this-over-max", "a/".repeat(127)));
        v.push("a".repeat(247));
        v.push("a".repeat(248));
        v.push(format!("x.io/{}", "b".repeat(255)));
        v.push(format!("x.io/{}", "b".repeat(256)));
        v.push(format!("a:{}", "t".repeat(128)));
        v.push(format!("a:{}", "t".repeat(129)));
        v.push(format!("Foo/{}", "b".repeat(252)));
        v
    }

    #[test]
    fn agrees_with_oci_client_except_where_it_follows_docker() {
        let mut departures = std::collections::BTreeMap::<&str, usize>::new();
        let mut accepted = 0;
        let corpus = corpus();
        for input in &corpus {
            let ours = parse(input);
            let theirs = input.parse::<Reference>();
            let same = match (&ours, &theirs) {
                (Ok(a), Ok(b)) => a == b && a.whole() == b.whole(),
                (Err(_), Err(_)) => true,
                _ => false,
            };
            if ours.is_ok() {
                accepted += 1;
            }
            if !same {
                let why = departure(input, &ours, &theirs)
                    .unwrap_or_else(|| panic!("{input:?}: ours {ours:?}, oci-client {theirs:?}"));
                *departures.entry(why).or_default() += 1;
            }
        }
        // The corpus exercises every departure, and accepts and refuses plenty.
        assert_eq!(
            departures.keys().copied().collect::<Vec<_>>(),
            [
                "64-hex image ID",
                "non-ASCII tag",
                "upper-case digest hex",
                "upper-case first component is a registry host"
            ],
            "{departures:?}"
        );
        assert!(
            accepted > 80 && corpus.len() - accepted > 80,
            "{accepted} of {}",
            corpus.len()
        );
    }

    #[test]
    fn normalises_like_docker() {
        let cases = [
            (
                "busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
            ),
            (
                "docker.io/foo",
                "docker.io",
                "library/foo",
                Some("latest"),
                None,
            ),
            (
                "index.docker.io/foo/bar:1",
                "docker.io",
                "foo/bar",
                Some("1"),
                None,
            ),
            ("localhost/foo", "localhost", "foo", Some("latest"), None),
            ("Foo/bar", "Foo", "bar", Some("latest"), None),
            (
                "test.com:5000",
                "docker.io",
                "library/test.com",
                Some("5000"),
                None,
            ),
            (
                "127.0.0.1:5055/base/busybox:1",
                "127.0.0.1:5055",
                "base/busybox",
                Some("1"),
                None,
            ),
        ];
        for (input, registry, repository, tag, digest) in cases {
            let r = parse(input).unwrap();
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (registry, repository, tag, digest),
                "{input}"
            );
        }
        let r = parse(&format!("x.io/a:t@{SHA256}")).unwrap();
        assert_eq!((r.tag(), r.digest()), (Some("t"), Some(SHA256)));
        let r = parse(&format!("x.io/a@{SHA256}")).unwrap();
        assert_eq!((r.tag(), r.digest()), (None, Some(SHA256)));
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = parse("registry.example.com/team/My-App:1").unwrap_err();
        assert_eq!(e.column, 27);
        assert!(e.to_string().contains("must be lower case"), "{e}");
        assert!(
            e.to_string()
                .contains("\"registry.example.com/team/My-App:1\""),
            "{e}"
        );
        let e = parse("x.io/a:bad/tag").unwrap_err();
        assert!(
            matches!(e.problem, Problem::BadComponent(_) | Problem::BadTag(_)),
            "{e}"
        );
        let e = parse("x.io/a:.tag").unwrap_err();
        assert_eq!((e.column, &e.problem), (8, &Problem::BadTag(".tag".into())));
        let e = parse("x.io/a@sha256:abcd").unwrap_err();
        assert_eq!(e.column, 8);
        let e = parse("ex_ample.com:5000/a").unwrap_err();
        assert_eq!(
            (e.column, &e.problem),
            (1, &Problem::BadDomain("ex_ample.com:5000".into()))
        );
        let e = parse("x.io/a//b").unwrap_err();
        assert_eq!(e.column, 8, "{e}");
        let e = parse("é/a:b").unwrap_err();
        assert_eq!(e.column, 1, "{e}");
        let e = parse("x.io/é:b").unwrap_err();
        assert_eq!(e.column, 6, "{e}");
        assert!(matches!(parse("").unwrap_err().problem, Problem::Empty));
    }
}

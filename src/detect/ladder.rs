//! The ladder: from a [`Report`], the strongest isolation and the fastest snapshotter this
//! machine allows, with the reason each better rung was skipped. `--isolation` and
//! `--snapshotter` force a rung (an error when it does not work here), `--min-isolation` sets a
//! floor so that CI can refuse a silent downgrade.
//!
//! Isolation, strongest first: `root` (real root; a user namespace with the full ID map) ->
//! `subordinate-ids` (an ordinary user; a user namespace mapped onto its /etc/subuid range by
//! newuidmap/newgidmap) -> `single-id` (only the user's own ID, as 0; files of other owners
//! cannot be made) -> `chroot` (real root where no namespace can be made, as in a default Docker
//! container: no mounts, each step chrooted into a copy of its rootfs, in the host's pid and
//! network namespaces). Below that the build is refused, with the report.
//!
//! Snapshotters, fastest first: `overlayfs` -> `fuse-overlayfs` -> `copy`.

use std::fmt;
use std::str::FromStr;

use super::Report;
use crate::sandbox::Snapshotter;
use crate::sandbox::userns::IdMapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isolation {
    InPlace,
    Chroot,
    SingleId,
    SubordinateIds,
    Root,
}

impl Isolation {
    /// Strongest first; the rungs tried on their own (`in-place` only ever runs when asked for).
    pub const LADDER: [Isolation; 4] = [
        Isolation::Root,
        Isolation::SubordinateIds,
        Isolation::SingleId,
        Isolation::Chroot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isolation::Root => "root",
            Isolation::SubordinateIds => "subordinate-ids",
            Isolation::SingleId => "single-id",
            Isolation::Chroot => "chroot",
            Isolation::InPlace => "in-place",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Isolation::LADDER
            .into_iter()
            .chain([Isolation::InPlace])
            .find(|i| i.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown isolation {s:?}: use root, subordinate-ids, single-id, chroot or in-place"
                )
            })
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub isolation: Option<Isolation>,
    pub min_isolation: Option<Isolation>,
    /// None: auto.
    pub snapshotter: Option<Snapshotter>,
}

/// A rung not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub rung: String,
    pub reason: String,
}

/// The modes a build runs in.
#[derive(Debug, Clone)]
pub struct Choice {
    pub isolation: Isolation,
    pub mapping: IdMapping,
    pub snapshotter: Snapshotter,
    pub skipped: Vec<Skip>,
}

impl Choice {
    /// Lines printed at the start of a build.
    pub fn describe(&self) -> String {
        let how = match self.isolation {
            Isolation::Chroot => {
                "real root, no namespaces: each step is chrooted into a copy of its rootfs".into()
            }
            Isolation::InPlace => {
                "no namespaces, no chroot: each step runs on this container's own /, which becomes the image's rootfs".into()
            }
            _ => self.mapping.describe(),
        };
        let mut s = format!(
            "isolation: {} ({how})\nsnapshotter: {}\n",
            self.isolation,
            self.snapshotter.name()
        );
        for skip in &self.skipped {
            s.push_str(&format!("  skipped {}: {}\n", skip.rung, skip.reason));
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LadderError {
    #[error(
        "no isolation works here, so shmocker refuses to build:\n{reasons}\nrun `shmocker detect` for the full report"
    )]
    Nothing { reasons: String },
    #[error("{flag} {value} cannot be used here: {reason}")]
    Forced {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "--min-isolation {floor}: the best isolation here is {best}, so shmocker refuses to build:\n{reasons}"
    )]
    BelowFloor {
        floor: Isolation,
        best: Isolation,
        reasons: String,
    },
}

/// Why a probe stops a rung: its cause and fix, or its detail.
fn why(report: &Report, probe: &str) -> String {
    match report.probe(probe) {
        Some(p) if p.ok() => String::new(),
        Some(p) => {
            let mut s = format!("probe {} {}", p.name, p.status);
            if let Some(c) = &p.cause {
                s.push_str(&format!(": {c}"));
            } else {
                s.push_str(&format!(": {}", p.detail));
            }
            if let Some(f) = &p.fix {
                s.push_str(&format!("; fix: {f}"));
            }
            s
        }
        None => format!("probe {probe} did not run"),
    }
}

/// The first failing probe among `needs`, as a reason.
fn blocker(report: &Report, needs: &[&str]) -> Option<String> {
    needs
        .iter()
        .find(|n| !report.works(n))
        .map(|n| why(report, n))
}

fn isolation_blocker(report: &Report, planned: &IdMapping, level: Isolation) -> Option<String> {
    if level == Isolation::Chroot {
        return blocker(report, &["chroot"]);
    }
    if level == Isolation::InPlace {
        return blocker(report, &["in-place"]);
    }
    match (level, planned) {
        (Isolation::Root, IdMapping::Identity) => {}
        (Isolation::Root, _) => return Some("not running as root".into()),
        (Isolation::SubordinateIds, IdMapping::Identity) => {
            return Some("running as root: the full ID map is used instead".into());
        }
        _ => {}
    }
    let base = ["userns", "map-single", "mount-ns"];
    if let Some(b) = blocker(report, &base) {
        return Some(b);
    }
    match (level, planned) {
        (Isolation::Root, IdMapping::Identity) => blocker(report, &["map-subordinate"]),
        (Isolation::Root, _) => Some("not running as root".into()),
        (Isolation::SubordinateIds, IdMapping::Identity) => {
            Some("running as root: the full ID map is used instead".into())
        }
        (Isolation::SubordinateIds, _) => blocker(report, &["map-subordinate"]),
        (Isolation::SingleId, _) | (Isolation::Chroot, _) | (Isolation::InPlace, _) => None,
    }
}

fn snapshotter_blocker(report: &Report, s: Snapshotter, isolation: Isolation) -> Option<String> {
    match (s, isolation) {
        (Snapshotter::Copy, Isolation::Chroot | Isolation::InPlace) => None,
        (_, Isolation::Chroot | Isolation::InPlace) => {
            Some(format!("the {isolation} isolation cannot mount anything"))
        }
        (Snapshotter::Overlayfs, _) => blocker(report, &["overlay-userxattr"]),
        (Snapshotter::FuseOverlayfs, _) => blocker(report, &["fuse-overlayfs"]),
        (Snapshotter::Copy, _) => blocker(report, &["mount-ns"]),
    }
}

/// Picks the modes (see the module docs).
pub fn choose(report: &Report, planned: &IdMapping, req: &Request) -> Result<Choice, LadderError> {
    let mut skipped = Vec::new();
    let isolation = match req.isolation {
        Some(forced) => {
            if let Some(reason) = isolation_blocker(report, planned, forced) {
                return Err(LadderError::Forced {
                    flag: "--isolation",
                    value: forced.name().into(),
                    reason,
                });
            }
            for better in Isolation::LADDER.into_iter().filter(|i| *i > forced) {
                skipped.push(Skip {
                    rung: format!("isolation {better}"),
                    reason: format!("--isolation {forced} was given"),
                });
            }
            forced
        }
        None => {
            let mut found = None;
            let mut reasons = Vec::new();
            for level in Isolation::LADDER {
                match isolation_blocker(report, planned, level) {
                    None => {
                        found = Some(level);
                        break;
                    }
                    Some(reason) => {
                        reasons.push(format!("  {level}: {reason}"));
                        skipped.push(Skip {
                            rung: format!("isolation {level}"),
                            reason,
                        });
                    }
                }
            }
            match found {
                Some(level) => level,
                None => {
                    if report.works("in-place") {
                        reasons.push(
                            "  in-place (never chosen on its own): this is root in a container; if the container is a throwaway one that runs nothing else, `--isolation in-place` runs the steps on its own filesystem (see docs/detect.md)".into(),
                        );
                    }
                    return Err(LadderError::Nothing {
                        reasons: reasons.join("\n"),
                    });
                }
            }
        }
    };
    if let Some(floor) = req.min_isolation
        && isolation < floor
    {
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("  {}: {}", s.rung, s.reason))
            .collect();
        return Err(LadderError::BelowFloor {
            floor,
            best: isolation,
            reasons: reasons.join("\n"),
        });
    }
    let mapping = match (isolation, planned) {
        (Isolation::Root, m) | (Isolation::SubordinateIds, m) => m.clone(),
        // No user namespace: the build's IDs are the host's, as real root.
        (Isolation::Chroot, _) | (Isolation::InPlace, _) => IdMapping::Identity,
        (Isolation::SingleId, IdMapping::Single { .. }) => planned.clone(),
        (Isolation::SingleId, _) => IdMapping::Single {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            reason: match req.isolation {
                Some(_) => "--isolation single-id".into(),
                None => skipped.last().map(|s| s.reason.clone()).unwrap_or_default(),
            },
        },
    };
    let snapshotter = match req.snapshotter {
        Some(forced) => {
            if let Some(reason) = snapshotter_blocker(report, forced, isolation) {
                return Err(LadderError::Forced {
                    flag: "--snapshotter",
                    value: forced.name().into(),
                    reason,
                });
            }
            for better in Snapshotter::ALL.into_iter().take_while(|s| *s != forced) {
                skipped.push(Skip {
                    rung: format!("snapshotter {}", better.name()),
                    reason: format!("--snapshotter {} was given", forced.name()),
                });
            }
            forced
        }
        None => {
            let mut found = Snapshotter::Copy;
            for s in Snapshotter::ALL {
                match snapshotter_blocker(report, s, isolation) {
                    None => {
                        found = s;
                        break;
                    }
                    Some(reason) => skipped.push(Skip {
                        rung: format!("snapshotter {}", s.name()),
                        reason,
                    }),
                }
            }
            found
        }
    };
    Ok(Choice {
        isolation,
        mapping,
        snapshotter,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Probe, Report};

    fn report(failing: &[&str]) -> Report {
        let names = [
            "userns",
            "map-single",
            "map-subordinate",
            "mount-ns",
            "overlay-userxattr",
            "fuse-overlayfs",
            "chroot",
            "in-place",
        ];
        Report {
            schema_version: 1,
            host: crate::detect::tests::host(),
            environment: None,
            network: Default::default(),
            probes: names
                .iter()
                .map(|n| Probe {
                    name: n.to_string(),
                    status: if failing.contains(n) { "failed" } else { "ok" },
                    detail: format!("{n} detail"),
                    errno: None,
                    problem: None,
                    cause: None,
                    fix: failing.contains(n).then(|| format!("fix {n}")),
                })
                .collect(),
            elapsed_ms: 0,
        }
    }

    const SUB: IdMapping = IdMapping::Subordinate {
        uid: 1000,
        gid: 1000,
        subuid: (100000, 65536),
        subgid: (100000, 65536),
    };

    #[test]
    fn the_strongest_working_rungs_are_taken_and_skips_say_why() {
        let c = choose(&report(&[]), &SUB, &Request::default()).unwrap();
        assert_eq!(
            (c.isolation, c.snapshotter),
            (Isolation::SubordinateIds, Snapshotter::Overlayfs)
        );
        assert_eq!(c.skipped[0].reason, "not running as root");

        let c = choose(
            &report(&["map-subordinate", "overlay-userxattr"]),
            &SUB,
            &Request::default(),
        )
        .unwrap();
        assert_eq!(c.isolation, Isolation::SingleId);
        assert!(matches!(c.mapping, IdMapping::Single { .. }));
        assert_eq!(c.snapshotter, Snapshotter::FuseOverlayfs);
        let text = c.describe();
        assert!(text.contains("skipped isolation subordinate-ids: probe map-subordinate failed"));
        assert!(text.contains("fix map-subordinate"), "{text}");
        assert!(text.contains("skipped snapshotter overlayfs"), "{text}");

        let c = choose(
            &report(&["overlay-userxattr", "fuse-overlayfs"]),
            &IdMapping::Identity,
            &Request::default(),
        )
        .unwrap();
        assert_eq!(
            (c.isolation, c.snapshotter),
            (Isolation::Root, Snapshotter::Copy)
        );
    }

    #[test]
    fn without_namespaces_root_gets_chroot_and_others_are_refused() {
        let none = report(&["userns", "map-single", "map-subordinate", "mount-ns"]);
        let c = choose(&none, &IdMapping::Identity, &Request::default()).unwrap();
        assert_eq!(
            (c.isolation, c.snapshotter),
            (Isolation::Chroot, Snapshotter::Copy)
        );
        let mut user = none.clone();
        user.probes
            .iter_mut()
            .find(|p| p.name == "chroot")
            .unwrap()
            .status = "skipped";
        let e = choose(&user, &SUB, &Request::default()).unwrap_err();
        assert!(matches!(e, LadderError::Nothing { .. }), "{e}");
        assert!(e.to_string().contains("fix userns"), "{e}");
    }

    #[test]
    fn in_place_runs_only_when_asked_for() {
        let nothing = report(&[
            "userns",
            "map-single",
            "map-subordinate",
            "mount-ns",
            "chroot",
        ]);
        let e = choose(&nothing, &IdMapping::Identity, &Request::default()).unwrap_err();
        assert!(matches!(e, LadderError::Nothing { .. }), "{e}");
        assert!(e.to_string().contains("`--isolation in-place`"), "{e}");
        let asked = Request {
            isolation: Some(Isolation::InPlace),
            ..Default::default()
        };
        let c = choose(&nothing, &IdMapping::Identity, &asked).unwrap();
        assert_eq!(
            (c.isolation, c.snapshotter),
            (Isolation::InPlace, Snapshotter::Copy)
        );
        assert_eq!(c.mapping, IdMapping::Identity);
        // Not in a container: refused even when asked for.
        let e = choose(&report(&["in-place"]), &IdMapping::Identity, &asked).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--isolation in-place cannot be used here: probe in-place failed"),
            "{e}"
        );
        let hint = choose(
            &report(&["userns", "chroot", "in-place"]),
            &SUB,
            &Request::default(),
        );
        assert!(
            !hint
                .unwrap_err()
                .to_string()
                .contains("--isolation in-place")
        );
        assert_eq!("in-place".parse::<Isolation>(), Ok(Isolation::InPlace));
    }

    #[test]
    fn forced_rungs_and_floors() {
        let r = report(&["fuse-overlayfs"]);
        let forced = Request {
            snapshotter: Some(Snapshotter::FuseOverlayfs),
            ..Default::default()
        };
        let e = choose(&r, &SUB, &forced).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--snapshotter fuse-overlayfs cannot be used here"),
            "{e}"
        );
        let copy = Request {
            snapshotter: Some(Snapshotter::Copy),
            isolation: Some(Isolation::SingleId),
            ..Default::default()
        };
        let c = choose(&r, &SUB, &copy).unwrap();
        assert_eq!(
            (c.isolation, c.snapshotter),
            (Isolation::SingleId, Snapshotter::Copy)
        );
        assert!(
            matches!(&c.mapping, IdMapping::Single { reason, .. } if reason == "--isolation single-id")
        );
        let floor = Request {
            min_isolation: Some(Isolation::SubordinateIds),
            ..Default::default()
        };
        let e = choose(&report(&["map-subordinate"]), &SUB, &floor).unwrap_err();
        assert!(matches!(e, LadderError::BelowFloor { .. }), "{e}");
        assert!(choose(&report(&[]), &SUB, &floor).is_ok());
        assert_eq!("chroot".parse::<Isolation>(), Ok(Isolation::Chroot));
        assert!("none".parse::<Isolation>().is_err());
    }
}

//! The verdict: what every key saw, checked against the contract, and the table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::faults::{Fault, FaultKind, Race, secs};
use crate::load::{Answer, Attempt, KeyRecord};
use crate::upstream::{Execution, Outcome, faulty};

/// The proxies' settings that bound what the checker accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `--lock-ttl`.
    pub(crate) lock_ttl: Duration,
    /// `--wait-timeout`.
    pub(crate) wait_timeout: Duration,
    /// `--upstream-timeout`.
    pub(crate) upstream_timeout: Duration,
    /// Allowed on top of wait-timeout + upstream-timeout.
    pub(crate) slack: Duration,
}

impl Limits {
    /// The longest any single request may take.
    pub(crate) fn bound(&self) -> Duration {
        self.wait_timeout + self.upstream_timeout + self.slack
    }
}

/// Everything the run produced.
pub(crate) struct Evidence<'a> {
    /// The seed (picks the upstream's faulty keys).
    pub(crate) seed: u64,
    /// When traffic started.
    pub(crate) t0: Instant,
    /// Every key's traffic, the races' and the sweep's included.
    pub(crate) records: &'a [KeyRecord],
    /// Every execution the upstream saw, by key.
    pub(crate) executions: &'a HashMap<String, Vec<Execution>>,
    /// Every fault.
    pub(crate) faults: &'a [Fault],
    /// Every race.
    pub(crate) races: &'a [Race],
    /// The proxies' settings.
    pub(crate) limits: Limits,
    /// Proxy names, by index.
    pub(crate) names: [&'static str; 2],
    /// Problems found outside the traffic (a proxy that died by itself, ...).
    pub(crate) extra: Vec<String>,
}

/// A stretch during which Redis lost its data.
#[derive(Debug, Clone, Copy)]
struct Wipe {
    start: Instant,
    end: Instant,
}

impl Wipe {
    /// Whether data read at `from` may have been lost by `to`.
    fn between(&self, from: Instant, to: Instant) -> bool {
        self.end >= from && self.start <= to
    }
}

/// How a key was touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Untouched,
    UpstreamOnly,
    CrashOrOutage,
}

/// The checks, counted for the table.
#[derive(Default)]
struct Tally {
    keys: usize,
    by_class: BTreeMap<Class, usize>,
    by_kind: BTreeMap<FaultKind, usize>,
    successes_hist: BTreeMap<usize, usize>,
    successes_hist_by_class: BTreeMap<Class, BTreeMap<usize, usize>>,
    failed_executions: usize,
    attempts: usize,
    logicals: usize,
    originals: usize,
    replays: usize,
    replays_checked: usize,
    errors: BTreeMap<String, usize>,
    max_latency: Duration,
    max_latency_paused: Duration,
    replayed_then_kept: usize,
    lost_to_wipe: usize,
    rerun_after_wipe: usize,
    /// 502 `outcome-unknown` answers: a request that may have run, never to run again.
    outcome_unknown: usize,
    /// Keys whose executions were checked for overlap (every key).
    overlap_keys: usize,
    /// Overlapping pairs of executions the contract allows, by why.
    overlaps_allowed: BTreeMap<Allowed, usize>,
    /// Overlapping pairs it does not allow (each one a violation).
    overlaps_found: usize,
    /// Executions whose handler was dropped before it answered.
    unanswered: usize,
}

/// Why two executions of one key may overlap in time: the earlier one's lease was lost while
/// its upstream request ran, and the contract lets the next owner run then (a lease lost while
/// its handler runs passes on, and the late owner's completion is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Allowed {
    /// Its proxy was SIGSTOPped while the upstream worked on it (a hang outlives the pause's
    /// start by up to the hang's length), and stayed stopped past the lease: the upstream's
    /// handler does not stop with the proxy, so the taker may run while it still does.
    Paused,
    /// Redis lost its data while it ran, the lease with it: a duplicate arriving after the
    /// restart finds no record and runs.
    Wiped,
}

impl Allowed {
    const ALL: [Allowed; 2] = [Allowed::Paused, Allowed::Wiped];

    fn describe(self) -> &'static str {
        match self {
            Allowed::Paused => "its proxy was SIGSTOPped past the lease mid-execution",
            Allowed::Wiped => "Redis lost the lease mid-execution",
        }
    }
}

/// A violation: which check, and what happened.
struct Violation {
    check: &'static str,
    what: String,
}

/// Checks everything, prints the table, and returns the number of violations.
pub(crate) fn verdict(ev: &Evidence<'_>) -> usize {
    let mut t = Tally::default();
    let mut v: Vec<Violation> = ev
        .extra
        .iter()
        .map(|what| Violation {
            check: "processes",
            what: what.clone(),
        })
        .collect();
    let lock_ttl = ev.limits.lock_ttl;
    // Redis data losses, from the moment the kill was decided to the restart: a request
    // within that stretch may have seen the data before or after.
    let wipes: Vec<Wipe> = ev
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::RedisWipe)
        .map(|f| Wipe {
            start: f.start,
            end: f.recovered,
        })
        .collect();
    let empty = Vec::new();
    let mut kept_successes: HashMap<&str, usize> = HashMap::new();

    for rec in ev.records {
        t.keys += 1;
        let key = rec.key.as_str();
        let every_exec = ev.executions.get(key).unwrap_or(&empty);
        check_overlap(key, every_exec, ev, &wipes, &mut t, &mut v);
        // The other checks look at executions that answered: a dropped handler never had an
        // outcome (it counts for overlap only).
        let execs: Vec<Execution> = every_exec
            .iter()
            .filter(|x| !matches!(x.outcome, Outcome::Unanswered))
            .cloned()
            .collect();
        t.unanswered += every_exec.len() - execs.len();
        let traffic: Vec<&Attempt> = rec
            .logicals
            .iter()
            .filter(|l| !l.sweep)
            .flat_map(|l| &l.attempts)
            .collect();
        let all: Vec<&Attempt> = rec.logicals.iter().flat_map(|l| &l.attempts).collect();
        let span_start = traffic.iter().map(|a| a.start).min();
        let span_end = traffic.iter().map(|a| a.end).max();

        // Which faults touched the key.
        let mut kinds = BTreeSet::new();
        if let (Some(s), Some(e)) = (span_start, span_end) {
            for f in ev.faults {
                let hit = match f.kind {
                    FaultKind::Upstream500 | FaultKind::UpstreamHang => {
                        f.kind.upstream().is_some_and(|u| faulty(ev.seed, u, key))
                            && s <= f.recovered
                            && e >= f.start
                    }
                    FaultKind::ProxyKill
                    | FaultKind::ProxyPause
                    | FaultKind::RedisAofRestart
                    | FaultKind::RedisWipe => s <= f.recovered + lock_ttl && e >= f.start,
                };
                if hit {
                    kinds.insert(f.kind);
                }
            }
        }
        for k in &kinds {
            *t.by_kind.entry(*k).or_default() += 1;
        }
        let class = if kinds.iter().any(|k| k.is_crash_or_outage()) {
            Class::CrashOrOutage
        } else if kinds.is_empty() {
            Class::Untouched
        } else {
            Class::UpstreamOnly
        };
        *t.by_class.entry(class).or_default() += 1;

        // A Redis wipe after the key's traffic removed its record: the sweep then runs it
        // again, as documented. The exact checks look at what happened before that.
        let cutoff = span_end.and_then(|e| wipes.iter().map(|w| w.start).filter(|w| *w > e).min());
        let kept = |t: Instant| cutoff.is_none_or(|c| t < c);
        let execs_kept: Vec<&Execution> = execs.iter().filter(|x| kept(x.at)).collect();
        let all_kept: Vec<&Attempt> = all.iter().filter(|a| kept(a.start)).copied().collect();

        // Executions.
        let successes: Vec<&Bytes> = execs
            .iter()
            .filter_map(|x| match &x.outcome {
                Outcome::Success(b) => Some(b),
                _ => None,
            })
            .collect();
        let successes_kept: Vec<&Bytes> = execs_kept
            .iter()
            .filter_map(|x| match &x.outcome {
                Outcome::Success(b) => Some(b),
                _ => None,
            })
            .collect();
        kept_successes.insert(key, successes_kept.len());
        if cutoff.is_some() {
            t.lost_to_wipe += 1;
            if successes.len() > successes_kept.len() {
                t.rerun_after_wipe += 1;
            }
        }
        let failed = execs.len() - successes.len();
        t.failed_executions += failed;
        *t.successes_hist.entry(successes_kept.len()).or_default() += 1;
        *t.successes_hist_by_class
            .entry(class)
            .or_default()
            .entry(successes_kept.len())
            .or_default() += 1;
        let owned: Vec<Execution> = execs_kept.iter().map(|x| (*x).clone()).collect();
        match class {
            Class::Untouched if execs_kept.len() != 1 || successes_kept.len() != 1 => {
                v.push(Violation {
                    check: "exactly once",
                    what: format!(
                        "{key}: no fault touched it, yet the upstream ran it {} times ({} successful){}{}",
                        execs_kept.len(),
                        successes_kept.len(),
                        describe_execs(&owned, ev),
                        describe_attempts(rec, ev)
                    ),
                })
            }
            // A hang ends in an answer that is stored: retries replay it, never run it again.
            Class::UpstreamOnly
                if !kinds.contains(&FaultKind::Upstream500) && execs_kept.len() != 1 =>
            {
                v.push(Violation {
                    check: "exactly once",
                    what: format!(
                        "{key}: touched only by upstream hangs, yet the upstream ran it {} times{}{}",
                        execs_kept.len(),
                        describe_execs(&owned, ev),
                        describe_attempts(rec, ev)
                    ),
                })
            }
            Class::UpstreamOnly if successes_kept.len() != 1 => v.push(Violation {
                check: "exactly once",
                what: format!(
                    "{key}: touched only by upstream errors ({}), yet it succeeded {} times{}{}",
                    names(&kinds),
                    successes_kept.len(),
                    describe_execs(&owned, ev),
                    describe_attempts(rec, ev)
                ),
            }),
            _ => {}
        }
        if failed > 0 && !kinds.iter().any(|k| k.upstream().is_some()) {
            v.push(Violation {
                check: "attribution",
                what: format!(
                    "{key}: {failed} failed executions, but no upstream fault is attributed to it"
                ),
            });
        }

        // Every 2xx: bytes the upstream produced; replays identical.
        let mut originals = 0;
        let mut replays_by_epoch: BTreeMap<usize, Vec<&Attempt>> = BTreeMap::new();
        for a in &all {
            let Some((status, body, content_type, replayed)) = a.success() else {
                continue;
            };
            if replayed {
                t.replays += 1;
            } else {
                t.originals += 1;
                originals += 1;
            }
            if status != 201 || content_type != "application/json" {
                v.push(Violation {
                    check: "replay identical",
                    what: format!("{key}: a 2xx with status {status} and content type {content_type:?}; the upstream only answers 201 application/json"),
                });
            }
            if !successes.contains(&body) {
                v.push(Violation {
                    check: "replay identical",
                    what: format!(
                        "{key}: a {} body the upstream never produced: {}",
                        if replayed { "replayed" } else { "2xx" },
                        show(body)
                    ),
                });
            }
            if replayed {
                // Replays during a wipe may have read either side of it: left out.
                let epoch_start = wipes.iter().filter(|w| w.end < a.start).count();
                let epoch_end = wipes.iter().filter(|w| w.start <= a.end).count();
                if epoch_start == epoch_end {
                    replays_by_epoch.entry(epoch_start).or_default().push(a);
                }
            }
        }
        let strict = matches!(class, Class::Untouched | Class::UpstreamOnly);
        if strict {
            // One success: every 2xx is that one, and exactly one of them is the original.
            let originals = all_kept
                .iter()
                .filter(|a| a.success().is_some_and(|s| !s.3))
                .count();
            if let [only] = successes_kept[..] {
                for a in &all_kept {
                    if let Some((_, body, _, _)) = a.success() {
                        t.replays_checked += 1;
                        if body != only {
                            v.push(Violation {
                                check: "replay identical",
                                what: format!(
                                    "{key}: got {} instead of the one execution's {}",
                                    show(body),
                                    show(only)
                                ),
                            });
                        }
                    }
                }
            }
            // A hung key's first caller got 504 while the upstream worked on: then every 2xx
            // is a replay of the late answer.
            let late_original = kinds.contains(&FaultKind::UpstreamHang) && originals == 0;
            if originals != 1 && successes_kept.len() == 1 && !late_original {
                v.push(Violation {
                    check: "replay identical",
                    what: format!("{key}: {originals} responses without Idempotent-Replayed; exactly one was the original"),
                });
            }
        }
        // Between two Redis data losses, one stored outcome: every replay the same bytes.
        for (epoch, replays) in &replays_by_epoch {
            let first = replays[0];
            for a in replays {
                if !(strict && kept(a.start)) {
                    t.replays_checked += 1;
                }
                let (Some((_, b0, _, _)), Some((_, b, _, _))) = (first.success(), a.success())
                else {
                    continue;
                };
                if b != b0 {
                    v.push(Violation {
                        check: "replay identical",
                        what: format!(
                            "{key}: two replays differ while Redis kept its data (epoch {epoch}): {} at {} via {} and {} at {} via {}",
                            show(b0),
                            at(ev.t0, first.end),
                            ev.names[first.proxy],
                            show(b),
                            at(ev.t0, a.end),
                            ev.names[a.proxy],
                        ),
                    });
                    break;
                }
            }
        }
        if originals > successes.len() {
            v.push(Violation {
                check: "replay identical",
                what: format!(
                    "{key}: {originals} original (not replayed) 2xx answers but {} successful executions",
                    successes.len()
                ),
            });
        }

        // Once a replay was served, the outcome is stored: nothing may run the key again
        // until Redis loses its data (this is also what AOF must keep across a restart).
        let replays: Vec<(Instant, Instant)> = all
            .iter()
            .filter(|a| a.success().is_some_and(|s| s.3))
            .map(|a| (a.start, a.end))
            .collect();
        for x in execs
            .iter()
            .filter(|x| matches!(x.outcome, Outcome::Success(_)))
        {
            // A replay seen before the run means the record existed at some moment of the
            // replay; only a wipe from then on can have removed it.
            let Some(replayed) = replays
                .iter()
                .filter(|(s, e)| *e < x.at && !wipes.iter().any(|w| w.between(*s, x.at)))
                .map(|(_, e)| e)
                .max()
            else {
                continue;
            };
            v.push(Violation {
                check: "stored stays stored",
                what: format!(
                    "{key}: ran again at {} via {} after a replay at {}, with no Redis data loss between{}{}",
                    at(ev.t0, x.at),
                    x.via,
                    at(ev.t0, *replayed),
                    aof_between(ev.faults, *replayed, x.at),
                    describe_attempts(rec, ev)
                ),
            });
        }
        let kept_across_aof = ev.faults.iter().any(|f| {
            f.kind == FaultKind::RedisAofRestart
                && replays
                    .iter()
                    .any(|(s, e)| *e < f.start && !wipes.iter().any(|w| w.between(*s, f.start)))
                && all.iter().any(|a| a.start > f.recovered)
        });
        if kept_across_aof {
            t.replayed_then_kept += 1;
        }

        // Every attempt: bounded latency, documented errors, and an end.
        for l in &rec.logicals {
            t.logicals += 1;
            for a in &l.attempts {
                t.attempts += 1;
                let paused = ev.faults.iter().any(|f| {
                    f.kind == FaultKind::ProxyPause
                        && f.proxy == Some(a.proxy)
                        && a.start <= f.recovered
                        && a.end >= f.start
                });
                let d = a.duration();
                if paused {
                    t.max_latency_paused = t.max_latency_paused.max(d);
                } else {
                    t.max_latency = t.max_latency.max(d);
                    if d > ev.limits.bound() {
                        v.push(Violation {
                            check: "latency",
                            what: format!(
                                "{key}: a request to proxy {} took {} (bound {}), sent at {}: {}",
                                ev.names[a.proxy],
                                secs(d),
                                secs(ev.limits.bound()),
                                at(ev.t0, a.start),
                                answer_line(&a.answer)
                            ),
                        });
                    }
                }
                check_error(key, a, &kinds, ev, &mut t, &mut v);
            }
            if let Some(last) = l.attempts.last()
                && last.success().is_none()
            {
                v.push(Violation {
                    check: "eventually answered",
                    what: format!(
                        "{key}: gave up after {} attempts; the last: {}",
                        l.attempts.len(),
                        answer_line(&last.answer)
                    ),
                });
            }
        }
    }

    // The races must have happened as planned, or the run proves nothing about fencing.
    for race in ev.races {
        for key in &race.keys {
            let execs = ev.executions.get(key).unwrap_or(&empty);
            let n = kept_successes.get(key.as_str()).copied().unwrap_or(0);
            if n != 2 {
                let traffic = ev
                    .records
                    .iter()
                    .find(|r| &r.key == key)
                    .map_or(String::new(), |r| describe_attempts(r, ev));
                v.push(Violation {
                    check: "race set up",
                    what: format!(
                        "{key}: the race on paused proxy {} ran {n} times instead of twice (the late owner's and the taker's); the run does not show fencing{}{traffic}",
                        ev.names[race.proxy],
                        describe_execs(execs, ev)
                    ),
                });
            }
        }
        // What the race guarantees: the paused proxy is resumed half a second after a whole
        // lock TTL from its stop, so each race key's lease, renewed at the latest when it
        // stopped, has expired in Redis by then, whether or not the taker has stored its
        // outcome yet. Its completion of each key, once it reads the body it holds, is then
        // owner-checked against a lease that is gone or the taker's: refused, one lease_lost
        // per race key at least. More are fine: the other keys it held when it was stopped
        // lose their leases too.
        match race.lease_lost {
            Some(n) if n >= race.keys.len() as u64 => {}
            Some(n) => v.push(Violation {
                check: "race refused",
                what: format!(
                    "the race on paused proxy {} ({}): {n} lease_lost events there, but each of its {} late completions should have been refused",
                    ev.names[race.proxy],
                    race.keys.join(", "),
                    race.keys.len()
                ),
            }),
            None => v.push(Violation {
                check: "race refused",
                what: format!(
                    "the race on paused proxy {} ({}): its metrics could not be read, so its refused completions are not shown",
                    ev.names[race.proxy],
                    race.keys.join(", ")
                ),
            }),
        }
    }

    print_table(ev, &t, &v);
    v.len()
}

/// No two executions of `key` overlapped in time, whatever faults touched it: at-least-once
/// after a crash means a retry runs after the first attempt, never beside it, as long as the
/// first one's lease holds. Only the cases of [`Allowed`] are exempt, each counted.
///
/// A proxy killed mid-flight is not among them, though its lease is lost too (it expires): the
/// upstream's handler runs on (or is dropped, and ends then, if hyper notices the closed
/// connection), but ends within the upstream's longest 700 ms, while the retry waits for the
/// lease to expire, at least two thirds of the lock TTL (1.3 s) after the last renewal before
/// the kill. Only a hang (3 s) could outlast that, and the schedule never kills a proxy while
/// hangs are on: a kill comes at 0.23 of a cycle (15 s or more), and a cycle's hangs are over
/// 6 s after its middle, before the next cycle's kill. Should the schedule change, an overlap here fails the check rather
/// than pass unseen.
fn check_overlap(
    key: &str,
    execs: &[Execution],
    ev: &Evidence<'_>,
    wipes: &[Wipe],
    t: &mut Tally,
    v: &mut Vec<Violation>,
) {
    t.overlap_keys += 1;
    let mut order: Vec<&Execution> = execs.iter().collect();
    order.sort_by_key(|x| x.at);
    // The earliest a lease can pass on after its owner stops renewing: it was renewed at most a
    // third of the TTL before.
    let lease_left = ev.limits.lock_ttl * 2 / 3;
    for (i, first) in order.iter().enumerate() {
        for later in &order[i + 1..] {
            // Still running when the run read them: it overlaps everything after its start.
            if first.end.is_some_and(|e| e <= later.at) {
                continue;
            }
            let first_end = first.end.unwrap_or_else(Instant::now);
            let paused = ev.faults.iter().any(|f| {
                f.kind == FaultKind::ProxyPause
                    && f.proxy.is_some_and(|p| ev.names[p] == first.via)
                    && first.at <= f.start
                    && f.start <= first_end
                    && f.recovered - f.start > ev.limits.lock_ttl
                    && later.at >= f.start + lease_left
            });
            let wiped = wipes
                .iter()
                .any(|w| first.at <= w.start && w.start <= first_end && later.at >= w.start);
            let allowed = if paused {
                Some(Allowed::Paused)
            } else if wiped {
                Some(Allowed::Wiped)
            } else {
                None
            };
            match allowed {
                Some(why) => *t.overlaps_allowed.entry(why).or_default() += 1,
                None => {
                    t.overlaps_found += 1;
                    v.push(Violation {
                        check: "no overlap",
                        what: format!(
                            "{key}: an execution via {} started at {} while one via {} from {} ran until {}, with no lease lost between{}",
                            later.via,
                            at(ev.t0, later.at),
                            first.via,
                            at(ev.t0, first.at),
                            first.end.map_or("the end".to_owned(), |e| at(ev.t0, e)),
                            describe_execs(execs, ev)
                        ),
                    });
                }
            }
        }
    }
}

/// The `type` of a problem document, if `body` is one.
fn problem_type(body: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    doc["type"].as_str().map(str::to_owned)
}

fn check_error(
    key: &str,
    a: &Attempt,
    kinds: &BTreeSet<FaultKind>,
    ev: &Evidence<'_>,
    t: &mut Tally,
    v: &mut Vec<Violation>,
) {
    match &a.answer {
        Answer::Response { status, .. } if (200..300).contains(status) => {}
        Answer::Response {
            status,
            content_type,
            retry_after,
            from_upstream,
            body,
            ..
        } => {
            let label = if *from_upstream {
                format!("{status} (upstream's)")
            } else {
                status.to_string()
            };
            *t.errors.entry(label).or_default() += 1;
            if !*from_upstream
                && problem_type(body).is_some_and(|ty| ty.ends_with(":outcome-unknown"))
            {
                t.outcome_unknown += 1;
            }
            if *from_upstream {
                let attributed = kinds.iter().any(|k| k.upstream().is_some());
                if *status != 500 || !attributed {
                    v.push(Violation {
                        check: "documented errors",
                        what: format!("{key}: the upstream's {status} reached the client, but no upstream fault was on for this key"),
                    });
                }
                return;
            }
            if !matches!(status, 409 | 502 | 503 | 504) {
                v.push(Violation {
                    check: "documented errors",
                    what: format!(
                        "{key}: proxy {} answered {status}, not a status a fault may cause (409, 502, 503, 504): {}",
                        ev.names[a.proxy],
                        show(body)
                    ),
                });
                return;
            }
            if !content_type.starts_with("application/problem+json") {
                v.push(Violation {
                    check: "documented errors",
                    what: format!("{key}: a {status} with content type {content_type:?} instead of application/problem+json"),
                });
            }
            let doc: Option<serde_json::Value> = serde_json::from_slice(body).ok();
            let well_formed = doc.as_ref().is_some_and(|d| {
                d["status"].as_u64() == Some(u64::from(*status))
                    && d["type"].is_string()
                    && d["title"].is_string()
                    && d["detail"].is_string()
            });
            if !well_formed {
                v.push(Violation {
                    check: "documented errors",
                    what: format!("{key}: a {status} whose body is not a problem document with type, title, status and detail: {}", show(body)),
                });
            }
            if matches!(status, 409 | 503) && retry_after.is_none() {
                v.push(Violation {
                    check: "documented errors",
                    what: format!("{key}: a {status} without Retry-After"),
                });
            }
        }
        Answer::Transport { error, timed_out } => {
            let label = if *timed_out {
                "client timeout"
            } else {
                "connection failed"
            };
            *t.errors.entry(label.to_owned()).or_default() += 1;
            let killed = ev.faults.iter().any(|f| {
                f.kind == FaultKind::ProxyKill
                    && f.proxy == Some(a.proxy)
                    && a.start <= f.recovered + ev.limits.lock_ttl
                    && a.end >= f.start
            });
            if !killed || *timed_out {
                v.push(Violation {
                    check: "documented errors",
                    what: format!(
                        "{key}: no HTTP answer from proxy {} (sent at {}, not while it was killed): {error}",
                        ev.names[a.proxy],
                        at(ev.t0, a.start)
                    ),
                });
            }
        }
    }
}

fn aof_between(faults: &[Fault], from: Instant, to: Instant) -> String {
    if faults
        .iter()
        .any(|f| f.kind == FaultKind::RedisAofRestart && f.start > from && f.start <= to)
    {
        " (an AOF restart between lost the record)".into()
    } else {
        String::new()
    }
}

fn describe_execs(execs: &[Execution], ev: &Evidence<'_>) -> String {
    let parts: Vec<String> = execs
        .iter()
        .map(|x| {
            let what = match &x.outcome {
                Outcome::Success(_) => "ok",
                Outcome::Failed => "500",
                Outcome::Unanswered => "dropped",
            };
            let end = x.end.map_or("running".to_owned(), |e| at(ev.t0, e));
            format!("{what} at {}..{end} via {}", at(ev.t0, x.at), x.via)
        })
        .collect();
    format!(": {}", parts.join(", "))
}

/// Every attempt of a key, one line each, for a violation's details.
fn describe_attempts(rec: &KeyRecord, ev: &Evidence<'_>) -> String {
    let mut out = String::new();
    for (i, l) in rec.logicals.iter().enumerate() {
        for a in &l.attempts {
            let _ = write!(
                out,
                "\n      copy {i}{} via {} {}..{}: {}",
                if l.sweep { " (sweep)" } else { "" },
                ev.names[a.proxy],
                at(ev.t0, a.start),
                at(ev.t0, a.end),
                answer_line(&a.answer)
            );
        }
    }
    out
}

fn names(kinds: &BTreeSet<FaultKind>) -> String {
    kinds
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn at(t0: Instant, t: Instant) -> String {
    format!("t+{:.2}s", t.saturating_duration_since(t0).as_secs_f64())
}

fn show(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.chars().count() > 160 {
        format!("{}...", text.chars().take(160).collect::<String>())
    } else {
        text.into_owned()
    }
}

fn answer_line(a: &Answer) -> String {
    match a {
        Answer::Response {
            status,
            replayed,
            body,
            ..
        } => format!(
            "{status}{} {}",
            if *replayed { " (replayed)" } else { "" },
            show(body)
        ),
        Answer::Transport { error, .. } => format!("no answer: {error}"),
    }
}

fn hist(h: &BTreeMap<usize, usize>) -> String {
    h.iter()
        .map(|(n, keys)| format!("{n}x: {keys}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_table(ev: &Evidence<'_>, t: &Tally, v: &[Violation]) {
    let mut out = String::new();
    let _ = writeln!(out, "\nfaults");
    let _ = writeln!(
        out,
        "  {:<9} {:<26} {:<6} {:>7}  detail",
        "at", "kind", "proxy", "lasted"
    );
    for f in ev.faults {
        let _ = writeln!(
            out,
            "  {:<9} {:<26} {:<6} {:>7}  {}",
            at(ev.t0, f.start),
            f.kind.name(),
            f.proxy.map_or("-", |p| ev.names[p]),
            secs(f.recovered - f.start),
            f.detail
        );
    }
    let class_name = |c: Class| match c {
        Class::Untouched => "untouched by any fault",
        Class::UpstreamOnly => "touched by upstream errors only",
        Class::CrashOrOutage => "touched by a crash or outage",
    };
    let rule = |c: Class| match c {
        Class::Untouched => "must run exactly once",
        Class::UpstreamOnly => "500s retried, one success; hangs run once",
        Class::CrashOrOutage => "at least once (documented)",
    };
    let _ = writeln!(out, "\nkeys: {}", t.keys);
    let _ = writeln!(
        out,
        "  {:<32} {:>6}  {:<42} successful executions per key",
        "class", "keys", "rule"
    );
    for c in [Class::Untouched, Class::UpstreamOnly, Class::CrashOrOutage] {
        let _ = writeln!(
            out,
            "  {:<32} {:>6}  {:<42} {}",
            class_name(c),
            t.by_class.get(&c).copied().unwrap_or(0),
            rule(c),
            t.successes_hist_by_class
                .get(&c)
                .map_or(String::new(), hist)
        );
    }
    let _ = writeln!(
        out,
        "  keys touched, by fault kind (a key may count under several):"
    );
    for k in FaultKind::ALL {
        let _ = writeln!(
            out,
            "    {:<28} {:>6}",
            k.name(),
            t.by_kind.get(&k).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "  executions per key (successful): {}; failed executions (500s): {}",
        hist(&t.successes_hist),
        t.failed_executions
    );
    let _ = writeln!(
        out,
        "  records a later Redis wipe removed: {} keys (the sweep ran {} of them again, as documented; not counted above)",
        t.lost_to_wipe, t.rerun_after_wipe
    );
    let _ = writeln!(out, "\nrequests");
    let _ = writeln!(
        out,
        "  copies sent {}, HTTP attempts {}, 2xx originals {}, 2xx replays {}",
        t.logicals, t.attempts, t.originals, t.replays
    );
    let _ = writeln!(
        out,
        "  2xx answers checked byte-identical: {}; keys replayed before an AOF restart and after: {}",
        t.replays_checked, t.replayed_then_kept
    );
    let errors = if t.errors.is_empty() {
        "none".to_owned()
    } else {
        t.errors
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "  errors by status: {errors}");
    let _ = writeln!(
        out,
        "  502 outcome-unknown answers (may have run; never run again): {}",
        t.outcome_unknown
    );
    let _ = writeln!(
        out,
        "  max latency {} (bound: wait-timeout {} + upstream-timeout {} + slack {} = {}); to a paused proxy {}",
        secs(t.max_latency),
        secs(ev.limits.wait_timeout),
        secs(ev.limits.upstream_timeout),
        secs(ev.limits.slack),
        secs(ev.limits.bound()),
        secs(t.max_latency_paused)
    );
    for race in ev.races {
        let _ = writeln!(
            out,
            "  race on paused proxy {} ({}): lease_lost events there (completions or releases the store refused, at least {} owed): {}",
            ev.names[race.proxy],
            race.keys.join(", "),
            race.keys.len(),
            race.lease_lost
                .map_or("metrics unreadable".to_owned(), |n| n.to_string())
        );
    }
    let allowed = Allowed::ALL
        .iter()
        .map(|a| {
            format!(
                "{} when {}",
                t.overlaps_allowed.get(a).copied().unwrap_or(0),
                a.describe()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "  overlapping executions: keys checked {}, overlaps found {}; allowed: {allowed}; executions dropped unanswered: {}",
        t.overlap_keys, t.overlaps_found, t.unanswered
    );
    let _ = writeln!(out, "\nchecks");
    let checks = [
        "exactly once",
        "attribution",
        "replay identical",
        "stored stays stored",
        "latency",
        "documented errors",
        "eventually answered",
        "race set up",
        "race refused",
        "no overlap",
        "processes",
    ];
    let allowed_total: usize = t.overlaps_allowed.values().sum();
    for c in checks {
        let n = v.iter().filter(|x| x.check == c).count();
        let verdict = if n == 0 {
            "ok".to_owned()
        } else {
            format!("FAILED ({n})")
        };
        let note = match c {
            "no overlap" => format!(
                "  ({} keys checked, {} overlaps found, {allowed_total} allowed as a lease lost mid-execution)",
                t.overlap_keys, t.overlaps_found
            ),
            "race refused" => format!(
                "  ({} races, each owing a refused completion per key)",
                ev.races.len()
            ),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {c:<22} {verdict}{note}");
    }
    if !v.is_empty() {
        let _ = writeln!(out, "\nviolations (first 30 of {}):", v.len());
        for x in v.iter().take(30) {
            let _ = writeln!(out, "  [{}] {}", x.check, x.what);
        }
    }
    print!("{out}");
}

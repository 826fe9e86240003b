//! The fault schedule: what breaks, when, and for how long. Every fault is logged with its
//! start and its recovery, so the checker can tell which keys it touched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::load::{self, KeyRecord, Logical, SendOptions, Target, joined};
use crate::procs::{Persistence, ProxyProc, Redis, event_count};
use crate::upstream::{Upstream, UpstreamFault};

/// How long an upstream fault (500s, hangs) stays on.
const UPSTREAM_FAULT: Duration = Duration::from_secs(3);
/// How long a SIGKILLed proxy stays down before it is started again.
const PROXY_DOWN: Duration = Duration::from_secs(1);
/// How long Redis stays down when it is restarted.
const REDIS_DOWN: Duration = Duration::from_millis(300);
/// The schedule repeats every this long (or the phase's length, if shorter).
const CYCLE: Duration = Duration::from_secs(30);
/// Keys per race.
const RACE_KEYS: usize = 3;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FaultKind {
    /// The upstream answers 500 for the faulty keys.
    Upstream500,
    /// The upstream hangs past the proxy's `--upstream-timeout` for the faulty keys.
    UpstreamHang,
    /// A proxy is SIGKILLed, then started again on the same port.
    ProxyKill,
    /// A proxy is SIGSTOPped past its leases' lifetime, then SIGCONTed (a race of a late
    /// owner against the one that took its lease over).
    ProxyPause,
    /// Redis is SIGKILLed and started again with nothing: without persistence, or switching to
    /// AOF. Every record is lost.
    RedisWipe,
    /// Redis is SIGKILLed and started again with its AOF (`appendfsync always`).
    RedisAofRestart,
}

impl FaultKind {
    /// Every kind, in table order.
    pub(crate) const ALL: [FaultKind; 6] = [
        FaultKind::Upstream500,
        FaultKind::UpstreamHang,
        FaultKind::ProxyKill,
        FaultKind::ProxyPause,
        FaultKind::RedisWipe,
        FaultKind::RedisAofRestart,
    ];

    /// Its name in the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::Upstream500 => "upstream 500s",
            FaultKind::UpstreamHang => "upstream hangs",
            FaultKind::ProxyKill => "proxy SIGKILL+restart",
            FaultKind::ProxyPause => "proxy SIGSTOP past lease",
            FaultKind::RedisWipe => "redis restart, data lost",
            FaultKind::RedisAofRestart => "redis restart with AOF",
        }
    }

    /// A crash or an outage, after which at-least-once is the documented promise; the upstream
    /// faults are not: a failed execution is not stored, and exactly one success is still owed.
    pub(crate) fn is_crash_or_outage(self) -> bool {
        !matches!(self, FaultKind::Upstream500 | FaultKind::UpstreamHang)
    }

    /// The upstream fault behind this kind, if it is one.
    pub(crate) fn upstream(self) -> Option<UpstreamFault> {
        match self {
            FaultKind::Upstream500 => Some(UpstreamFault::Error500),
            FaultKind::UpstreamHang => Some(UpstreamFault::Hang),
            _ => None,
        }
    }
}

/// One fault that happened.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    /// What.
    pub(crate) kind: FaultKind,
    /// The proxy it hit (0 = A, 1 = B), for proxy faults.
    pub(crate) proxy: Option<usize>,
    /// When it began.
    pub(crate) start: Instant,
    /// When the system was whole again (restart done, fault off, process continued).
    pub(crate) recovered: Instant,
    /// More about it, for the table.
    pub(crate) detail: String,
}

/// What a race on a paused proxy showed.
#[derive(Debug, Clone)]
pub(crate) struct Race {
    /// The keys raced.
    pub(crate) keys: Vec<String>,
    /// The proxy that was paused (the late owner).
    pub(crate) proxy: usize,
    /// `lease_lost` events of the paused proxy during the race: completions or releases its
    /// store refused because the lease had passed on. `None` when its metrics could not be
    /// read before or after.
    pub(crate) lease_lost: Option<u64>,
}

/// What the schedule produced.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Every fault, in order.
    pub(crate) faults: Vec<Fault>,
    /// Every race.
    pub(crate) races: Vec<Race>,
    /// The races' own traffic.
    pub(crate) race_records: Vec<KeyRecord>,
}

/// Everything the schedule acts on.
pub(crate) struct World {
    /// The shared Redis.
    pub(crate) redis: Redis,
    /// Proxies A and B.
    pub(crate) proxies: [ProxyProc; 2],
    /// The upstream.
    pub(crate) upstream: Upstream,
    /// Where clients send.
    pub(crate) target: Arc<Target>,
    /// The proxies' lease lifetime.
    pub(crate) lock_ttl: Duration,
    /// Seed for the races' clients.
    pub(crate) seed: u64,
}

/// Runs the schedule from `t0` for `duration`: the first half with Redis without persistence,
/// the second with AOF. Each half repeats a cycle of: upstream 500s, a proxy SIGKILL, a Redis
/// restart, upstream hangs, and a race on the other proxy paused past its lease.
pub(crate) async fn run(world: &mut World, t0: Instant, duration: Duration) -> Result<Log, String> {
    let mut log = Log::default();
    let half = duration / 2;
    let cycles = (half.as_secs_f64() / CYCLE.as_secs_f64()).floor().max(1.0) as u32;
    let cycle = half / cycles;
    let mut n = 0usize;
    for (phase, mode) in [Persistence::None, Persistence::Aof]
        .into_iter()
        .enumerate()
    {
        let phase_start = t0 + half * phase as u32;
        if world.redis.persistence() != mode {
            sleep_until(phase_start).await;
            redis_restart(world, &mut log, mode).await?;
        }
        for i in 0..cycles {
            let cs = phase_start + cycle * i;
            let at = |f: f64| cs + cycle.mul_f64(f);
            let killed = n % 2;
            sleep_until(at(0.07)).await;
            upstream_fault(world, &mut log, FaultKind::Upstream500).await;
            sleep_until(at(0.23)).await;
            proxy_kill(world, &mut log, killed).await?;
            sleep_until(at(0.37)).await;
            redis_restart(world, &mut log, mode).await?;
            sleep_until(at(0.50)).await;
            upstream_fault(world, &mut log, FaultKind::UpstreamHang).await;
            sleep_until(at(0.67)).await;
            race(world, &mut log, 1 - killed, n).await?;
            n += 1;
        }
    }
    Ok(log)
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t.into()).await;
}

async fn upstream_fault(world: &World, log: &mut Log, kind: FaultKind) {
    let Some(fault) = kind.upstream() else {
        return;
    };
    let start = Instant::now();
    world.upstream.set(fault, true);
    tokio::time::sleep(UPSTREAM_FAULT).await;
    world.upstream.set(fault, false);
    log.faults.push(Fault {
        kind,
        proxy: None,
        start,
        recovered: Instant::now(),
        detail: "on for a third of the keys".into(),
    });
}

async fn proxy_kill(world: &mut World, log: &mut Log, p: usize) -> Result<(), String> {
    let client = world.target.client.clone();
    let proxy = &mut world.proxies[p];
    let start = Instant::now();
    proxy.kill();
    tokio::time::sleep(PROXY_DOWN).await;
    proxy.start(&client).await?;
    log.faults.push(Fault {
        kind: FaultKind::ProxyKill,
        proxy: Some(p),
        start,
        recovered: Instant::now(),
        detail: format!("proxy {} down {}", proxy.name, secs(Instant::now() - start)),
    });
    Ok(())
}

async fn redis_restart(world: &mut World, log: &mut Log, mode: Persistence) -> Result<(), String> {
    let before = world.redis.dbsize();
    let previous = world.redis.persistence();
    let start = Instant::now();
    world.redis.kill();
    tokio::time::sleep(REDIS_DOWN).await;
    // Blocks this task only: the traffic runs on the runtime's workers meanwhile.
    world.redis.restart_with(mode)?;
    let recovered = Instant::now();
    let after = world.redis.dbsize();
    let kind = if previous == Persistence::Aof && mode == Persistence::Aof {
        FaultKind::RedisAofRestart
    } else {
        FaultKind::RedisWipe
    };
    let show = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let detail = if previous == mode {
        format!("{}: keys {} -> {}", mode.name(), show(before), show(after))
    } else {
        format!(
            "{} -> {}: keys {} -> {}",
            previous.name(),
            mode.name(),
            show(before),
            show(after)
        )
    };
    log.faults.push(Fault {
        kind,
        proxy: None,
        start,
        recovered,
        detail,
    });
    Ok(())
}

/// A race of a late owner: proxy `p` owns fresh keys and has the upstream's response head when
/// it is SIGSTOPped; the body follows while it is stopped; its lease expires and the other proxy
/// takes the keys over, runs them again and stores its outcome; then `p` continues and tries to
/// complete with its own outcome, which the store must refuse. Copies sent afterwards must
/// replay what the other proxy stored, the same bytes as the replays before.
async fn race(world: &mut World, log: &mut Log, p: usize, n: usize) -> Result<(), String> {
    let other = 1 - p;
    let client = world.target.client.clone();
    let keys: Vec<String> = (0..RACE_KEYS).map(|i| format!("race-{n}-{i}")).collect();
    let lost_before = world.proxies[p]
        .metrics(&client)
        .await
        .map(|m| event_count(&m, "lease_lost"));
    let mut hooks = Vec::new();
    let mut originals = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        hooks.push(world.upstream.arm_race(key));
        let (target, key, seed) = (world.target.clone(), key.clone(), world.seed ^ i as u64);
        originals.spawn(async move {
            let l = load::logical(target, key.clone(), p, SendOptions::default(), seed).await;
            (key, l)
        });
    }
    let mut releases = Vec::new();
    for (key, (started, release)) in keys.iter().zip(hooks) {
        if tokio::time::timeout(Duration::from_secs(5), started)
            .await
            .is_err()
        {
            return Err(format!(
                "race: {key} never reached the upstream through proxy {}",
                world.proxies[p].name
            ));
        }
        releases.push(release);
    }
    // Let the response heads reach the proxy, which then reads the bodies with no deadline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Instant::now();
    world.proxies[p].signal("STOP")?;
    // Nothing below returns early before SIGCONT.
    for release in releases {
        let _ = release.send(());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut during = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        for j in 0..3 {
            let (target, key) = (world.target.clone(), key.clone());
            let seed = world.seed ^ (100 + 10 * i + j) as u64;
            during.spawn(async move {
                let l =
                    load::logical(target, key.clone(), other, SendOptions::default(), seed).await;
                (key, l)
            });
        }
    }
    // The other proxy takes over once the lease expires; give it the time to store its outcome.
    let mut done = Vec::new();
    let deadline = stop + world.lock_ttl + Duration::from_secs(4);
    while !during.is_empty() {
        match tokio::time::timeout_at(deadline.into(), during.join_next()).await {
            Ok(Some(r)) => done.push(joined(r)),
            Ok(None) | Err(_) => break,
        }
    }
    sleep_until(stop + world.lock_ttl + Duration::from_millis(500)).await;
    let resumed = world.proxies[p].signal("CONT");
    let cont = Instant::now();
    log.faults.push(Fault {
        kind: FaultKind::ProxyPause,
        proxy: Some(p),
        start: stop,
        recovered: cont,
        detail: format!(
            "proxy {} stopped {} (lease {}), {} race keys",
            world.proxies[p].name,
            secs(cont - stop),
            secs(world.lock_ttl),
            keys.len()
        ),
    });
    resumed?;
    while let Some(r) = during.join_next().await {
        done.push(joined(r));
    }
    while let Some(r) = originals.join_next().await {
        done.push(joined(r));
    }
    // The late owner has had its say by now; these must replay the one stored outcome.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut after = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        for j in 0..4 {
            let (target, key) = (world.target.clone(), key.clone());
            let seed = world.seed ^ (200 + 10 * i + j) as u64;
            after.spawn(async move {
                let l =
                    load::logical(target, key.clone(), j % 2, SendOptions::default(), seed).await;
                (key, l)
            });
        }
    }
    while let Some(r) = after.join_next().await {
        done.push(joined(r));
    }
    let lost_after = world.proxies[p]
        .metrics(&client)
        .await
        .map(|m| event_count(&m, "lease_lost"));
    for key in &keys {
        let logicals: Vec<Logical> = done
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, l)| l.clone())
            .collect();
        log.race_records.push(KeyRecord {
            key: key.clone(),
            logicals,
        });
    }
    log.races.push(Race {
        keys,
        proxy: p,
        lease_lost: lost_before
            .zip(lost_after)
            .map(|(b, a)| a.saturating_sub(b)),
    });
    Ok(())
}

/// A duration as seconds with one decimal.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

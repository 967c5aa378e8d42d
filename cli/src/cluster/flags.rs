//! The flags `service create` and `update` share, and a service spec
//! from them.

use anyhow::{bail, Context, Result};
use clap::Args;
use husk_cluster_api::types::*;

#[derive(Args, Default)]
pub struct Policy {
    #[arg(long)]
    pub(crate) replicas_max_per_node: Option<u64>,
    #[arg(long)]
    pub(crate) reserve_cpu: Option<f64>,
    #[arg(long)]
    pub(crate) reserve_memory: Option<String>,
    #[arg(long)]
    pub(crate) limit_cpu: Option<f64>,
    #[arg(long)]
    pub(crate) limit_memory: Option<String>,
    /// none, on-failure or any.
    #[arg(long)]
    pub(crate) restart_condition: Option<String>,
    #[arg(long)]
    pub(crate) restart_delay: Option<String>,
    #[arg(long)]
    pub(crate) restart_max_attempts: Option<u64>,
    #[arg(long)]
    pub(crate) restart_window: Option<String>,
    #[arg(long)]
    pub(crate) update_parallelism: Option<u64>,
    #[arg(long)]
    pub(crate) update_delay: Option<String>,
    /// pause, continue or rollback.
    #[arg(long)]
    pub(crate) update_failure_action: Option<String>,
    #[arg(long)]
    pub(crate) update_monitor: Option<String>,
    #[arg(long)]
    pub(crate) update_max_failure_ratio: Option<f64>,
    /// stop-first or start-first.
    #[arg(long)]
    pub(crate) update_order: Option<String>,
    #[arg(long)]
    pub(crate) rollback_parallelism: Option<u64>,
    #[arg(long)]
    pub(crate) rollback_delay: Option<String>,
    #[arg(long)]
    pub(crate) rollback_failure_action: Option<String>,
    #[arg(long)]
    pub(crate) rollback_monitor: Option<String>,
    #[arg(long)]
    pub(crate) rollback_max_failure_ratio: Option<f64>,
    #[arg(long)]
    pub(crate) rollback_order: Option<String>,
    #[arg(long)]
    pub(crate) health_cmd: Option<String>,
    #[arg(long)]
    pub(crate) health_interval: Option<String>,
    #[arg(long)]
    pub(crate) health_timeout: Option<String>,
    #[arg(long)]
    pub(crate) health_retries: Option<u64>,
    #[arg(long)]
    pub(crate) health_start_period: Option<String>,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub(crate) name: String,
    #[arg(long)]
    pub(crate) replicas: Option<u64>,
    /// replicated or global.
    #[arg(long, default_value = "replicated")]
    pub(crate) mode: String,
    #[arg(long)]
    pub(crate) constraint: Vec<String>,
    #[arg(long)]
    pub(crate) placement_pref: Vec<String>,
    #[arg(short, long)]
    pub(crate) env: Vec<String>,
    /// type=volume,source=NAME,target=/PATH[,readonly] or type=tmpfs,target=/PATH.
    #[arg(long)]
    pub(crate) mount: Vec<String>,
    /// published=8080,target=80[,protocol=udp] or 8080:80[/udp].
    #[arg(short, long)]
    pub(crate) publish: Vec<String>,
    #[arg(short, long)]
    pub(crate) label: Vec<String>,
    /// Return at once (the default: huskd converges in the background).
    #[arg(short, long)]
    pub(crate) detach: bool,
    #[command(flatten)]
    pub(crate) policy: Policy,
    pub(crate) image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) args: Vec<String>,
}

#[derive(Args)]
pub struct UpdateArgs {
    #[arg(long)]
    pub(crate) image: Option<String>,
    #[arg(long)]
    pub(crate) replicas: Option<u64>,
    /// New arguments (one string, split on spaces).
    #[arg(long)]
    pub(crate) args: Option<String>,
    #[arg(long)]
    pub(crate) env_add: Vec<String>,
    #[arg(long)]
    pub(crate) env_rm: Vec<String>,
    #[arg(long)]
    pub(crate) constraint_add: Vec<String>,
    #[arg(long)]
    pub(crate) constraint_rm: Vec<String>,
    /// Replace every task even if nothing changed.
    #[arg(long)]
    pub(crate) force: bool,
    #[arg(long)]
    pub(crate) rollback: bool,
    #[arg(short, long)]
    pub(crate) detach: bool,
    #[command(flatten)]
    pub(crate) policy: Policy,
    pub(crate) service: String,
}

pub(crate) fn parse_port(p: &str) -> Result<PortSpec> {
    let bad = || {
        anyhow::anyhow!(
            "--publish {p:?}: published=8080,target=80[,protocol=tcp|udp] or 8080:80[/udp]"
        )
    };
    let mut spec = PortSpec {
        published: 0,
        target: 0,
        protocol: Protocol::Tcp,
    };
    if p.contains('=') {
        for kv in p.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match k {
                "published" => spec.published = v.parse().map_err(|_| bad())?,
                "target" => spec.target = v.parse().map_err(|_| bad())?,
                "protocol" => spec.protocol = v.parse()?,
                "mode" if v == "host" || v == "ingress" => {}
                _ => return Err(bad()),
            }
        }
    } else {
        let (ports, proto) = p.split_once('/').unwrap_or((p, "tcp"));
        let (a, b) = ports.split_once(':').ok_or_else(bad)?;
        spec.published = a.parse().map_err(|_| bad())?;
        spec.target = b.parse().map_err(|_| bad())?;
        spec.protocol = proto.parse()?;
    }
    Ok(spec)
}

pub(crate) fn parse_mount(m: &str) -> Result<MountSpec> {
    let mut spec = MountSpec {
        typ: MountType::Volume,
        source: String::new(),
        target: String::new(),
        read_only: false,
    };
    for kv in m.split(',') {
        match kv.split_once('=') {
            Some(("type", v)) => spec.typ = v.parse().with_context(|| format!("--mount {m:?}"))?,
            Some(("source" | "src", v)) => spec.source = v.into(),
            Some(("target" | "dst" | "destination", v)) => spec.target = v.into(),
            Some(("readonly" | "ro", v)) => spec.read_only = v != "false" && v != "0",
            None if kv == "readonly" || kv == "ro" => spec.read_only = true,
            _ => bail!("--mount {m:?}: unknown option {kv:?}"),
        }
    }
    if spec.target.is_empty() {
        bail!("--mount {m:?}: no target");
    }
    if spec.typ == MountType::Volume && spec.source.is_empty() {
        bail!("--mount {m:?}: a volume needs source=NAME");
    }
    Ok(spec)
}

pub(crate) fn labels(v: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    v.iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            if k.is_empty() {
                bail!("label {l:?}: key=value");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

pub(crate) fn cpus(c: f64) -> Result<i64> {
    if !(c > 0.0 && c < 1024.0) {
        bail!("cpu {c}: a positive number of CPUs");
    }
    Ok((c * 1e9) as i64)
}

/// `--update-*` or `--rollback-*`: parallelism, delay, failure action,
/// monitor, max failure ratio, order.
pub(crate) type UpdateFlags<'a> = (
    Option<u64>,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    Option<f64>,
    &'a Option<String>,
);

impl Policy {
    pub(crate) fn apply(&self, s: &mut ServiceSpec) -> Result<()> {
        if let Some(n) = self.replicas_max_per_node {
            s.placement.max_replicas_per_node = n;
        }
        let mem = |m: &str| husk_runtime::container::spec::parse_memory(m);
        if let Some(c) = self.reserve_cpu {
            s.resources.reservations.nano_cpus = cpus(c)?;
        }
        if let Some(m) = &self.reserve_memory {
            s.resources.reservations.memory_bytes = mem(m)?;
        }
        if let Some(c) = self.limit_cpu {
            s.resources.limits.nano_cpus = cpus(c)?;
        }
        if let Some(m) = &self.limit_memory {
            s.resources.limits.memory_bytes = mem(m)?;
        }
        let r = &mut s.restart_policy;
        if let Some(c) = &self.restart_condition {
            r.condition = c.parse()?;
        }
        if let Some(d) = &self.restart_delay {
            r.delay_ms = parse_duration(d)?;
        }
        if let Some(n) = self.restart_max_attempts {
            r.max_attempts = n;
        }
        if let Some(w) = &self.restart_window {
            r.window_ms = parse_duration(w)?;
        }
        fn upd(
            u: &mut UpdateConfig,
            (par, delay, action, monitor, ratio, order): UpdateFlags,
        ) -> Result<()> {
            if let Some(p) = par {
                u.parallelism = p;
            }
            if let Some(d) = delay {
                u.delay_ms = parse_duration(d)?;
            }
            if let Some(a) = action {
                u.failure_action = a.parse()?;
            }
            if let Some(m) = monitor {
                u.monitor_ms = parse_duration(m)?;
            }
            if let Some(r) = ratio {
                u.max_failure_ratio = r;
            }
            if let Some(o) = order {
                u.order = o.parse()?;
            }
            Ok(())
        }
        upd(
            &mut s.update_config,
            (
                self.update_parallelism,
                &self.update_delay,
                &self.update_failure_action,
                &self.update_monitor,
                self.update_max_failure_ratio,
                &self.update_order,
            ),
        )?;
        upd(
            &mut s.rollback_config,
            (
                self.rollback_parallelism,
                &self.rollback_delay,
                &self.rollback_failure_action,
                &self.rollback_monitor,
                self.rollback_max_failure_ratio,
                &self.rollback_order,
            ),
        )?;
        if let Some(cmd) = &self.health_cmd {
            let h = s.healthcheck.get_or_insert_with(|| Healthcheck {
                interval_ms: 30_000,
                timeout_ms: 30_000,
                retries: 3,
                ..Default::default()
            });
            h.test = vec!["CMD-SHELL".into(), cmd.clone()];
        }
        if let Some(h) = s.healthcheck.as_mut() {
            if let Some(d) = &self.health_interval {
                h.interval_ms = parse_duration(d)?;
            }
            if let Some(d) = &self.health_timeout {
                h.timeout_ms = parse_duration(d)?;
            }
            if let Some(n) = self.health_retries {
                h.retries = n;
            }
            if let Some(d) = &self.health_start_period {
                h.start_period_ms = parse_duration(d)?;
            }
        }
        Ok(())
    }
}

pub fn spec_from_create(a: &CreateArgs) -> Result<ServiceSpec> {
    let mode = match (a.mode.as_str(), a.replicas) {
        ("replicated", r) => Mode::Replicated {
            replicas: r.unwrap_or(1),
        },
        ("global", None) => Mode::Global,
        ("global", Some(_)) => bail!("--replicas does not go with --mode global"),
        (m, _) => bail!("--mode {m:?}: replicated or global"),
    };
    let mut s = ServiceSpec {
        name: a.name.clone(),
        image: a.image.clone(),
        args: a.args.clone(),
        env: a.env.clone(),
        mounts: a
            .mount
            .iter()
            .map(|m| parse_mount(m))
            .collect::<Result<_>>()?,
        ports: a
            .publish
            .iter()
            .map(|p| parse_port(p))
            .collect::<Result<_>>()?,
        mode,
        placement: Placement {
            constraints: a.constraint.clone(),
            preferences: a.placement_pref.clone(),
            max_replicas_per_node: 0,
        },
        labels: labels(&a.label)?,
        ..Default::default()
    };
    a.policy.apply(&mut s)?;
    s.validate()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_mounts() {
        assert_eq!(parse_port("8080:80").unwrap().published, 8080);
        assert_eq!(
            parse_port("published=53,target=53,protocol=udp")
                .unwrap()
                .protocol,
            Protocol::Udp
        );
        assert!(parse_port("8080").is_err());
        let m = parse_mount("type=volume,source=db,target=/var/lib/db,readonly").unwrap();
        assert!(m.read_only && m.source == "db");
        assert!(parse_mount("type=volume,target=/x").is_err());
        assert!(parse_mount("type=tmpfs,target=/t").is_ok());
    }

    #[test]
    fn durations_like_docker() {
        assert_eq!(parse_duration("10s").unwrap(), 10_000);
        assert_eq!(parse_duration("1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration("500ms").unwrap(), 500);
        assert_eq!(parse_duration("2").unwrap(), 2000);
        assert_eq!(parse_duration("1.5s").unwrap(), 1500);
        for bad in ["", "s", "10x", "10s5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

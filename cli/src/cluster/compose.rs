//! Compose files (v3, the `docker stack deploy` subset) to service specs.
//! Keys husk does not act on are reported, as `docker stack deploy` does
//! ("Ignoring unsupported options: ..."), never dropped silently; a value
//! husk cannot read is an error naming its path in the file.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_yaml_ng::Value;

use husk_cluster_api::types::*;

/// The label naming a service's stack (Docker's).
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

#[derive(Debug, Default)]
pub struct Stack {
    /// In an order that starts dependencies first.
    pub services: Vec<ServiceSpec>,
    /// Named volumes, with the stack's prefix.
    pub volumes: Vec<String>,
    /// What husk ignores, one line each (`services.web.build`, ...).
    pub ignored: Vec<String>,
    /// How networks are taken (single-host), when the file declares some.
    pub notes: Vec<String>,
}

fn s(v: &Value) -> Option<String> {
    match v {
        Value::String(x) => Some(x.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_at(v: &Value, path: &str) -> Result<String> {
    s(v).with_context(|| format!("{path}: expected a string"))
}

fn map_at<'a>(v: &'a Value, path: &str) -> Result<&'a serde_yaml_ng::Mapping> {
    v.as_mapping()
        .with_context(|| format!("{path}: expected a mapping"))
}

/// A list of strings, or a string (split like a shell would, simply).
fn words(v: &Value, path: &str) -> Result<Vec<String>> {
    match v {
        Value::String(x) => Ok(x.split_whitespace().map(String::from).collect()),
        Value::Sequence(_) => words_list(v, path),
        _ => bail!("{path}: expected a string or a list"),
    }
}

/// `KEY=VALUE` entries from a list or a mapping (environment, labels).
fn pairs(v: &Value, path: &str) -> Result<Vec<(String, String)>> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let e = str_at(x, &format!("{path}[{i}]"))?;
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                Ok((k.to_string(), v.to_string()))
            })
            .collect(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let k = str_at(k, path)?;
                let v = if v.is_null() {
                    String::new()
                } else {
                    str_at(v, &format!("{path}.{k}"))?
                };
                Ok((k, v))
            })
            .collect(),
        _ => bail!("{path}: expected a list or a mapping"),
    }
}

/// `key` of `m` parsed as a T, if present: errors name `path.key`.
fn field<T>(m: &serde_yaml_ng::Mapping, key: &str, path: &str) -> Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let Some(v) = m.get(key) else {
        return Ok(None);
    };
    let at = format!("{path}.{key}");
    let t = str_at(v, &at)?;
    t.parse()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{at}: {t:?}: {e}"))
}

fn duration(v: &Value, path: &str) -> Result<u64> {
    let t = str_at(v, path)?;
    parse_duration(&t).with_context(|| path.to_string())
}

fn cpus(v: &Value, path: &str) -> Result<i64> {
    let t = str_at(v, path)?;
    let c: f64 = t
        .parse()
        .with_context(|| format!("{path}: {t:?} is not a number of CPUs"))?;
    if !(c > 0.0 && c < 1024.0) {
        bail!("{path}: {t:?} is not a number of CPUs");
    }
    Ok((c * 1e9) as i64)
}

fn memory(v: &Value, path: &str) -> Result<i64> {
    let t = str_at(v, path)?;
    husk_runtime::container::spec::parse_memory(&t).with_context(|| path.to_string())
}

/// Reports keys of `m` outside `known` under `path`.
fn report(m: &serde_yaml_ng::Mapping, path: &str, known: &[&str], ignored: &mut Vec<String>) {
    for k in m.keys() {
        let k = s(k).unwrap_or_else(|| "?".into());
        if !known.contains(&k.as_str()) {
            ignored.push(format!("{path}.{k}"));
        }
    }
}

/// Parses `text` as stack `stack`. Service names become `<stack>_<name>`,
/// volumes `<stack>_<volume>`, as `docker stack deploy` names them.
pub fn parse(text: &str, stack: &str) -> Result<Stack> {
    check_name(stack).context("stack name")?;
    let doc: Value = serde_yaml_ng::from_str(text).context("not a YAML document")?;
    let top = map_at(&doc, "(top level)")?;
    let mut out = Stack::default();
    report(
        top,
        "",
        &["version", "services", "volumes", "networks"],
        &mut out.ignored,
    );
    if let Some(v) = top.get("version") {
        let v = str_at(v, "version")?;
        if !v.starts_with('3') {
            bail!("version {v:?}: stacks need a version 3 compose file");
        }
    }
    let services = map_at(
        top.get("services").context("no services in the file")?,
        "services",
    )?;
    let mut volumes = Vec::new();
    if let Some(vs) = top.get("volumes").filter(|v| !v.is_null()) {
        for (k, v) in map_at(vs, "volumes")? {
            let name = str_at(k, "volumes")?;
            if let Some(m) = v.as_mapping() {
                report(m, &format!("volumes.{name}"), &[], &mut out.ignored);
            }
            volumes.push(name);
        }
    }
    if let Some(ns) = top.get("networks").filter(|v| !v.is_null()) {
        let names: Vec<String> = map_at(ns, "networks")?.keys().filter_map(s).collect();
        out.notes.push(format!(
            "networks {}: every task joins its node's bridge (single-host); per-network isolation and service names in DNS are not implemented",
            names.join(", ")
        ));
    }
    let mut specs: BTreeMap<String, (ServiceSpec, Vec<String>)> = BTreeMap::new();
    for (k, v) in services {
        let short = str_at(k, "services")?;
        check_name(&short).with_context(|| format!("services.{short}"))?;
        let path = format!("services.{short}");
        let m = map_at(v, &path)?;
        let (spec, deps) = service(stack, &short, m, &path, &volumes, &mut out.ignored)?;
        specs.insert(short, (spec, deps));
    }
    for (name, (_, deps)) in &specs {
        for d in deps {
            if !specs.contains_key(d) {
                bail!("services.{name}.depends_on: no service {d:?} in the file");
            }
        }
    }
    // Dependencies first (and a cycle is an error).
    let mut done: Vec<String> = Vec::new();
    while done.len() < specs.len() {
        let ready: Vec<String> = specs
            .iter()
            .filter(|(n, (_, deps))| !done.contains(n) && deps.iter().all(|d| done.contains(d)))
            .map(|(n, _)| n.clone())
            .collect();
        if ready.is_empty() {
            let left: Vec<&String> = specs.keys().filter(|n| !done.contains(n)).collect();
            bail!("depends_on forms a cycle among {left:?}");
        }
        done.extend(ready);
    }
    for n in done {
        if let Some((spec, _)) = specs.remove(&n) {
            out.services.push(spec);
        }
    }
    out.volumes = volumes.iter().map(|v| format!("{stack}_{v}")).collect();
    Ok(out)
}

fn service(
    stack: &str,
    short: &str,
    m: &serde_yaml_ng::Mapping,
    path: &str,
    volumes: &[String],
    ignored: &mut Vec<String>,
) -> Result<(ServiceSpec, Vec<String>)> {
    report(
        m,
        path,
        &[
            "image",
            "command",
            "environment",
            "ports",
            "volumes",
            "depends_on",
            "deploy",
            "healthcheck",
            "networks",
            "labels",
        ],
        ignored,
    );
    let mut spec = ServiceSpec {
        name: format!("{stack}_{short}"),
        image: str_at(
            m.get("image")
                .with_context(|| format!("{path}: no image (husk does not build images)"))?,
            &format!("{path}.image"),
        )?,
        ..Default::default()
    };
    spec.labels
        .insert(STACK_LABEL.to_string(), stack.to_string());
    if let Some(c) = m.get("command") {
        spec.args = words(c, &format!("{path}.command"))?;
    }
    if let Some(e) = m.get("environment") {
        spec.env = pairs(e, &format!("{path}.environment"))?
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
    }
    if let Some(l) = m.get("labels") {
        // Container labels: kept on the service, as husk has no
        // container labels of its own.
        for (k, v) in pairs(l, &format!("{path}.labels"))? {
            spec.labels.insert(k, v);
        }
    }
    if let Some(ps) = m.get("ports") {
        let Value::Sequence(items) = ps else {
            bail!("{path}.ports: expected a list");
        };
        for (i, p) in items.iter().enumerate() {
            spec.ports.push(port(p, &format!("{path}.ports[{i}]"))?);
        }
    }
    if let Some(vs) = m.get("volumes") {
        let Value::Sequence(items) = vs else {
            bail!("{path}.volumes: expected a list");
        };
        for (i, v) in items.iter().enumerate() {
            spec.mounts
                .push(mount(stack, v, &format!("{path}.volumes[{i}]"), volumes)?);
        }
    }
    let mut deps = Vec::new();
    if let Some(d) = m.get("depends_on") {
        let dp = format!("{path}.depends_on");
        match d {
            Value::Sequence(_) => {
                for n in words(d, &dp)? {
                    deps.push((n, DependCondition::Started));
                }
            }
            Value::Mapping(dm) => {
                for (k, v) in dm {
                    let n = str_at(k, &dp)?;
                    let cond = match v
                        .as_mapping()
                        .and_then(|c| c.get("condition"))
                        .and_then(s)
                        .as_deref()
                    {
                        None | Some("service_started") => DependCondition::Started,
                        Some("service_healthy") => DependCondition::Healthy,
                        Some("service_completed_successfully") => DependCondition::Completed,
                        Some(o) => bail!("{dp}.{n}.condition {o:?}: service_started, service_healthy or service_completed_successfully"),
                    };
                    deps.push((n, cond));
                }
            }
            _ => bail!("{dp}: expected a list or a mapping"),
        }
    }
    spec.depends_on = deps
        .iter()
        .map(|(n, c)| Dependency {
            service: format!("{stack}_{n}"),
            condition: *c,
        })
        .collect();
    if let Some(h) = m.get("healthcheck") {
        spec.healthcheck = healthcheck(h, &format!("{path}.healthcheck"), ignored)?;
    }
    if let Some(n) = m.get("networks") {
        // Validated for shape only: see Stack::notes.
        match n {
            Value::Sequence(_) | Value::Mapping(_) => {}
            _ => bail!("{path}.networks: expected a list or a mapping"),
        }
    }
    if let Some(d) = m.get("deploy") {
        deploy(&mut spec, d, &format!("{path}.deploy"), ignored)?;
    }
    spec.validate().with_context(|| path.to_string())?;
    Ok((spec, deps.into_iter().map(|(n, _)| n).collect()))
}

fn port(p: &Value, path: &str) -> Result<PortSpec> {
    let bad = |t: &str| anyhow::anyhow!("{path}: {t:?}: expected PUBLISHED:TARGET[/PROTOCOL]");
    match p {
        Value::Mapping(m) => {
            let get = |k: &str| m.get(k).and_then(s);
            let num = |k: &str| -> Result<u16> {
                get(k)
                    .with_context(|| format!("{path}.{k}: missing"))?
                    .parse()
                    .with_context(|| format!("{path}.{k}: not a port"))
            };
            Ok(PortSpec {
                target: num("target")?,
                published: num("published")?,
                protocol: get("protocol")
                    .map(|p| p.parse().with_context(|| format!("{path}.protocol")))
                    .transpose()?
                    .unwrap_or_default(),
            })
        }
        _ => {
            let t = str_at(p, path)?;
            let (ports, proto) = t.split_once('/').unwrap_or((&t, "tcp"));
            let parts: Vec<&str> = ports.split(':').collect();
            let (a, b) = match parts.as_slice() {
                [a, b] => (*a, *b),
                [_ip, a, b] => (*a, *b),
                _ => return Err(bad(&t)),
            };
            Ok(PortSpec {
                published: a.parse().map_err(|_| bad(&t))?,
                target: b.parse().map_err(|_| bad(&t))?,
                protocol: proto.parse().with_context(|| path.to_string())?,
            })
        }
    }
}

fn mount(stack: &str, v: &Value, path: &str, declared: &[String]) -> Result<MountSpec> {
    let (typ, source, target, ro) = match v {
        Value::Mapping(m) => {
            let get = |k: &str| m.get(k).and_then(s);
            (
                get("type").unwrap_or_else(|| "volume".into()),
                get("source").unwrap_or_default(),
                get("target").with_context(|| format!("{path}.target: missing"))?,
                get("read_only").is_some_and(|r| r == "true"),
            )
        }
        _ => {
            let t = str_at(v, path)?;
            let parts: Vec<&str> = t.split(':').collect();
            match parts.as_slice() {
                [src, dst] => ("volume".into(), src.to_string(), dst.to_string(), false),
                [src, dst, mode] => (
                    "volume".into(),
                    src.to_string(),
                    dst.to_string(),
                    mode.split(',').any(|m| m == "ro"),
                ),
                _ => bail!("{path}: {t:?}: expected VOLUME:/PATH[:ro] (anonymous volumes are not supported)"),
            }
        }
    };
    if typ == "bind" || source.starts_with('/') || source.starts_with('.') {
        bail!("{path}: host paths (bind mounts) are not supported in stacks: tasks move between hosts; use a named volume");
    }
    let typ: MountType = typ.parse().with_context(|| path.to_string())?;
    if typ == MountType::Volume && !declared.contains(&source) {
        bail!("{path}: volume {source:?} is not declared under the top-level volumes");
    }
    Ok(MountSpec {
        source: if typ == MountType::Volume {
            format!("{stack}_{source}")
        } else {
            source
        },
        typ,
        target,
        read_only: ro,
    })
}

fn healthcheck(h: &Value, path: &str, ignored: &mut Vec<String>) -> Result<Option<Healthcheck>> {
    let m = map_at(h, path)?;
    report(
        m,
        path,
        &[
            "test",
            "interval",
            "timeout",
            "retries",
            "start_period",
            "disable",
        ],
        ignored,
    );
    if m.get("disable").and_then(Value::as_bool) == Some(true) {
        return Ok(None);
    }
    let test = match m.get("test") {
        Some(Value::String(t)) => vec!["CMD-SHELL".to_string(), t.clone()],
        Some(t) => words(t, &format!("{path}.test"))?,
        None => bail!("{path}.test: missing"),
    };
    match test.first().map(String::as_str) {
        Some("NONE") => return Ok(None),
        Some("CMD" | "CMD-SHELL") if test.len() > 1 => {}
        _ => bail!("{path}.test: expected [\"CMD\", ...], [\"CMD-SHELL\", \"...\"] or a string"),
    }
    let d = |k: &str, def: u64| -> Result<u64> {
        m.get(k)
            .map_or(Ok(def), |v| duration(v, &format!("{path}.{k}")))
    };
    Ok(Some(Healthcheck {
        test,
        interval_ms: d("interval", 30_000)?,
        timeout_ms: d("timeout", 30_000)?,
        retries: field(m, "retries", path)?.unwrap_or(3),
        start_period_ms: d("start_period", 0)?,
    }))
}

fn update_config(u: &Value, path: &str, ignored: &mut Vec<String>) -> Result<UpdateConfig> {
    let m = map_at(u, path)?;
    report(
        m,
        path,
        &[
            "parallelism",
            "delay",
            "failure_action",
            "monitor",
            "max_failure_ratio",
            "order",
        ],
        ignored,
    );
    let mut c = UpdateConfig::default();
    if let Some(v) = field(m, "parallelism", path)? {
        c.parallelism = v;
    }
    if let Some(v) = m.get("delay") {
        c.delay_ms = duration(v, &format!("{path}.delay"))?;
    }
    if let Some(v) = field(m, "failure_action", path)? {
        c.failure_action = v;
    }
    if let Some(v) = m.get("monitor") {
        c.monitor_ms = duration(v, &format!("{path}.monitor"))?;
    }
    if let Some(v) = field(m, "max_failure_ratio", path)? {
        c.max_failure_ratio = v;
    }
    if let Some(v) = field(m, "order", path)? {
        c.order = v;
    }
    Ok(c)
}

fn deploy(spec: &mut ServiceSpec, d: &Value, path: &str, ignored: &mut Vec<String>) -> Result<()> {
    let m = map_at(d, path)?;
    report(
        m,
        path,
        &[
            "mode",
            "replicas",
            "placement",
            "resources",
            "restart_policy",
            "update_config",
            "rollback_config",
            "labels",
        ],
        ignored,
    );
    let replicas: Option<u64> = field(m, "replicas", path)?;
    spec.mode = match m.get("mode").and_then(s).as_deref() {
        None | Some("replicated") => Mode::Replicated {
            replicas: replicas.unwrap_or(1),
        },
        Some("global") if replicas.is_none() => Mode::Global,
        Some("global") => bail!("{path}: replicas does not go with mode global"),
        Some(o) => bail!("{path}.mode {o:?}: replicated or global"),
    };
    if let Some(p) = m.get("placement") {
        let pp = format!("{path}.placement");
        let pm = map_at(p, &pp)?;
        report(
            pm,
            &pp,
            &["constraints", "preferences", "max_replicas_per_node"],
            ignored,
        );
        if let Some(c) = pm.get("constraints") {
            spec.placement.constraints = words_list(c, &format!("{pp}.constraints"))?;
        }
        if let Some(Value::Sequence(prefs)) = pm.get("preferences") {
            for (i, pref) in prefs.iter().enumerate() {
                let sp = pref
                    .as_mapping()
                    .and_then(|x| x.get("spread"))
                    .and_then(s)
                    .with_context(|| {
                        format!("{pp}.preferences[{i}]: expected spread: node.labels.KEY")
                    })?;
                spec.placement.preferences.push(format!("spread={sp}"));
            }
        }
        if let Some(v) = field(pm, "max_replicas_per_node", &pp)? {
            spec.placement.max_replicas_per_node = v;
        }
    }
    if let Some(r) = m.get("resources") {
        let rp = format!("{path}.resources");
        let rm = map_at(r, &rp)?;
        report(rm, &rp, &["limits", "reservations"], ignored);
        for (k, dst) in [
            ("limits", &mut spec.resources.limits),
            ("reservations", &mut spec.resources.reservations),
        ] {
            if let Some(x) = rm.get(k) {
                let xp = format!("{rp}.{k}");
                let xm = map_at(x, &xp)?;
                report(xm, &xp, &["cpus", "memory"], ignored);
                if let Some(c) = xm.get("cpus") {
                    dst.nano_cpus = cpus(c, &format!("{xp}.cpus"))?;
                }
                if let Some(mem) = xm.get("memory") {
                    dst.memory_bytes = memory(mem, &format!("{xp}.memory"))?;
                }
            }
        }
    }
    if let Some(r) = m.get("restart_policy") {
        let rp = format!("{path}.restart_policy");
        let rm = map_at(r, &rp)?;
        report(
            rm,
            &rp,
            &["condition", "delay", "max_attempts", "window"],
            ignored,
        );
        let p = &mut spec.restart_policy;
        if let Some(c) = field(rm, "condition", &rp)? {
            p.condition = c;
        }
        if let Some(v) = rm.get("delay") {
            p.delay_ms = duration(v, &format!("{rp}.delay"))?;
        }
        if let Some(v) = field(rm, "max_attempts", &rp)? {
            p.max_attempts = v;
        }
        if let Some(v) = rm.get("window") {
            p.window_ms = duration(v, &format!("{rp}.window"))?;
        }
    }
    if let Some(u) = m.get("update_config") {
        spec.update_config = update_config(u, &format!("{path}.update_config"), ignored)?;
    }
    if let Some(u) = m.get("rollback_config") {
        spec.rollback_config = update_config(u, &format!("{path}.rollback_config"), ignored)?;
    }
    if let Some(l) = m.get("labels") {
        for (k, v) in pairs(l, &format!("{path}.labels"))? {
            spec.labels.insert(k, v);
        }
    }
    Ok(())
}

fn words_list(v: &Value, path: &str) -> Result<Vec<String>> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| str_at(x, &format!("{path}[{i}]")))
            .collect(),
        _ => bail!("{path}: expected a list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker's example voting app stack, images swapped for local ones.
    const VOTING: &str = include_str!("../../examples/voting-stack.yml");

    #[test]
    fn the_voting_app_parses_in_dependency_order() {
        let s = parse(VOTING, "vote").unwrap();
        let names: Vec<&str> = s.services.iter().map(|x| x.name.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert_eq!(names.len(), 5);
        assert!(pos("vote_redis") < pos("vote_vote"));
        assert!(pos("vote_db") < pos("vote_result"));
        assert!(pos("vote_db") < pos("vote_worker") && pos("vote_redis") < pos("vote_worker"));
        let db = &s.services[pos("vote_db")];
        assert_eq!(db.mounts[0].source, "vote_db-data");
        assert_eq!(db.placement.constraints, ["node.role==manager"]);
        assert!(db.env.contains(&"POSTGRES_USER=postgres".to_string()));
        let vote = &s.services[pos("vote_vote")];
        assert_eq!(vote.mode, Mode::Replicated { replicas: 1 });
        assert_eq!((vote.ports[0].published, vote.ports[0].target), (5000, 80));
        assert_eq!(vote.args, ["httpd", "-f", "-p", "80", "-h", "/etc"]);
        assert_eq!(db.healthcheck.as_ref().unwrap().interval_ms, 5000);
        let w = &s.services[pos("vote_worker")];
        assert_eq!(w.restart_policy.max_attempts, 3);
        assert_eq!(w.depends_on[0].service, "vote_db");
        assert_eq!(w.depends_on[0].condition, DependCondition::Healthy);
        assert_eq!(w.restart_policy.window_ms, 120_000);
        assert_eq!(w.labels.get("APP").map(String::as_str), Some("VOTING"));
        assert_eq!(w.labels.get(STACK_LABEL).map(String::as_str), Some("vote"));
        assert_eq!(s.ignored, ["services.worker.stop_grace_period"]);
        assert!(s.notes[0].contains("frontend, backend"));
        assert_eq!(s.volumes, ["vote_db-data"]);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let cases = [
            ("services: {a: {command: x}}", "no image"),
            (
                "services: {a: {image: x, depends_on: [b]}}",
                "no service \"b\"",
            ),
            (
                "services: {a: {image: x, ports: [\"80\"]}}",
                "services.a.ports[0]",
            ),
            (
                "services: {a: {image: x, volumes: [\"/etc:/x\"]}}",
                "host paths",
            ),
            (
                "services: {a: {image: x, volumes: [\"v:/x\"]}}",
                "not declared",
            ),
            (
                "services: {a: {image: x, depends_on: [b]}, b: {image: y, depends_on: [a]}}",
                "cycle",
            ),
            (
                "services: {a: {image: x, deploy: {replicas: many}}}",
                "replicas",
            ),
            (
                "services: {a: {image: x, deploy: {placement: {constraints: [\"zone==1\"]}}}}",
                "zone==1",
            ),
            ("version: \"2\"\nservices: {a: {image: x}}", "version 3"),
            ("[1, 2]", "expected a mapping"),
            (
                "services: {a: {image: x, healthcheck: {test: [\"WHAT\"]}}}",
                "healthcheck.test",
            ),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", parse(text, "s").unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}

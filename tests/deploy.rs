//! The files under deploy/: they parse, use only flags `tally run` has and metrics
//! docs/metrics.md lists, ship the default pipeline, and `promtool check rules`
//! accepts the alert rules.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn deploy_files(ext: &[&str]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files(&root().join("deploy"), &mut all);
    all.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ext.contains(&e))
    });
    all.sort();
    all
}

fn yaml_docs(p: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(p).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yaml = deploy_files(&["yaml", "yml"]);
    assert!(yaml.len() >= 6, "{yaml:?}");
    for p in &yaml {
        assert!(!yaml_docs(p).is_empty(), "{}", p.display());
    }
    let json = deploy_files(&["json"]);
    assert!(!json.is_empty());
    for p in &json {
        let text = std::fs::read_to_string(p).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

/// Names of metrics in docs/metrics.md.
fn documented() -> BTreeSet<String> {
    std::fs::read_to_string(root().join("docs/metrics.md"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// Every `tally_...` name in a text.
fn used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tally_") {
        let start = i + at;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end] == b'_' || b[end].is_ascii_digit())
        {
            end += 1;
        }
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if boundary {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_documented_metrics() {
    let docs = documented();
    let mut checked = 0;
    for p in [
        root().join("deploy/grafana/tally.json"),
        root().join("deploy/prometheus/alerts.yml"),
    ] {
        let names = used(&std::fs::read_to_string(&p).unwrap());
        assert!(names.len() >= 4, "{}: {names:?}", p.display());
        for n in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| docs.contains(*b)))
                .unwrap_or(&n);
            assert!(
                docs.contains(base),
                "{}: {n} is not in docs/metrics.md",
                p.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .expect("promtool (bash scripts/deps.sh installs Debian's prometheus)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_configmap_ships_the_default_pipeline() {
    let docs = yaml_docs(&root().join("deploy/k8s/configmap.yaml"));
    let text = docs[0]["data"]["pipeline.toml"].as_str().unwrap();
    assert_eq!(text, tally::pipeline::DEFAULT_PIPELINE);
    tally::pipeline::Pipeline::parse("configmap", text).unwrap();
}

#[test]
fn deploy_files_use_only_flags_tally_run_has() {
    let help = common::ok(&["run", "--help"]).stdout;
    let help = String::from_utf8(help).unwrap();
    let mut flags = BTreeSet::new();
    let sts = yaml_docs(&root().join("deploy/k8s/statefulset.yaml"));
    for a in sts[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
    {
        flags.insert(a.as_str().unwrap().to_owned());
    }
    let unit = std::fs::read_to_string(root().join("deploy/systemd/tally.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    flags.extend(exec.split_whitespace().map(str::to_owned));
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let cmd = docker
        .lines()
        .skip_while(|l| !l.starts_with("CMD"))
        .collect::<Vec<_>>()
        .join(" ");
    flags.extend(cmd.split('"').map(str::to_owned));
    flags.retain(|f| f.starts_with("--"));
    assert!(flags.len() >= 5, "{flags:?}");
    for f in flags {
        assert!(
            help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
            "`tally run` has no {f}"
        );
    }
}

#[test]
fn the_image_is_built_in_stages_and_runs_as_a_user() {
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let stages = docker.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage: {stages} FROM lines");
    let user = docker
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    assert!(docker.contains("cargo build --release --locked"));
    let sts = yaml_docs(&root().join("deploy/k8s/statefulset.yaml"));
    let sec = &sts[0]["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(sec["runAsNonRoot"].as_bool(), Some(true));
}

/// The StatefulSet, its `--processes`, the hosts ConfigMap and the headless Service
/// describe the same cluster: one hosts line per replica, pod i's stable name on
/// line i at the timely port; the process index comes from the pod index; the gRPC
/// API Service reaches process 0 alone.
#[test]
fn the_cluster_manifests_agree() {
    let sts = &yaml_docs(&root().join("deploy/k8s/statefulset.yaml"))[0];
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert!(replicas >= 2, "a multi-process cluster");
    assert_eq!(
        sts["spec"]["podManagementPolicy"].as_str(),
        Some("Parallel")
    );
    // Pods of two versions cannot form a cluster: no rolling update.
    assert_eq!(
        sts["spec"]["updateStrategy"]["type"].as_str(),
        Some("OnDelete")
    );
    let name = sts["metadata"]["name"].as_str().unwrap();
    let service = sts["spec"]["serviceName"].as_str().unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |f: &str| args[args.iter().position(|a| *a == f).unwrap() + 1];
    assert_eq!(flag("--processes").parse::<usize>().unwrap(), replicas);
    let process = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("TALLY_PROCESS"))
        .expect("TALLY_PROCESS set");
    assert_eq!(
        process["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );
    let port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("timely"))
        .expect("a timely port")["containerPort"]
        .as_u64()
        .unwrap();

    // The hosts file, as mounted at the --hosts path.
    let hosts_path = Path::new(flag("--hosts"));
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| hosts_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("--hosts is mounted");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm_name = volume["configMap"]["name"].as_str().unwrap();
    let cms = yaml_docs(&root().join("deploy/k8s/configmap.yaml"));
    let cm = cms
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(cm_name))
        .expect("the hosts ConfigMap");
    let key = hosts_path.file_name().unwrap().to_str().unwrap();
    let hosts: Vec<&str> = cm["data"][key]
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("{name}-{i}.{service}:{port}"))
        .collect();
    assert_eq!(hosts, want);
    // And tally itself accepts that file for every process.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    std::fs::write(&file, cm["data"][key].as_str().unwrap()).unwrap();
    for i in 0..replicas {
        tally::dataflow::Cluster::from_hosts_file(&file, replicas, i, Default::default()).unwrap();
    }

    let services = yaml_docs(&root().join("deploy/k8s/service.yaml"));
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(service))
        .unwrap();
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    assert!(headless["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["port"].as_u64() == Some(port)));
    let grpc = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some("tally-grpc"))
        .unwrap();
    assert_eq!(
        grpc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"].as_str(),
        Some(format!("{name}-0").as_str())
    );
}

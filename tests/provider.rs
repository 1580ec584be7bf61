//! The OpenFaaS provider API of multivm end to end, on real KVM with
//! testguest: faas-cli's request sequences replayed byte for byte in
//! shape (faas-cli itself is not installable here), basic auth, a
//! deployment that survives a restart, removal while requests wait, and
//! bad input on every /system route.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{app_image, dir_entries, http_with, testguest, Reply, Scratch};
use serde_json::{json, Value};

/// Guest memory of the testguest runtime and the per-VM overhead: 40 MiB a VM.
const MEM: u64 = 32;
const BUDGET: u64 = 8 * (MEM + 8);

/// A config with one declared function (`declared`), a `deploy` section
/// whose state lives in `state/` and whose images are under `apps/`, and
/// the runtimes `testguest` (boots) and, given a language snapshot,
/// `restored` (restores from it).
fn config(s: &Scratch, snapshot: Option<&Path>) -> String {
    let rootfs = s.file("rootfs.img", &[0u8; 4096]);
    std::fs::create_dir_all(s.path("apps/team")).unwrap();
    app_image(s, "apps/hello.img", &["fn=hello"]);
    app_image(s, "apps/team/echo.img", &["fn=echo"]);
    app_image(s, "apps/spin.img", &["fn=spin"]);
    app_image(s, "apps/sleep.img", &["fn=sleep"]);
    let declared = app_image(s, "declared.img", &["fn=hello"]);
    let mut y = format!(
        "kernel_path: {kernel}
vm_overhead: 8
boot_timeout: 20s
functions:
  declared:
    runtimefs: {rootfs}
    appfs: {declared}
    memory: {MEM}
deploy:
  state_dir: {state}
  image_dir: {apps}
  runtimes:
    testguest:
      runtimefs: {rootfs}
      memory: {MEM}
",
        kernel = testguest().display(),
        rootfs = rootfs.display(),
        declared = declared.display(),
        state = s.path("state").display(),
        apps = s.path("apps").display(),
    );
    if let Some(snap) = snapshot {
        y += &format!(
            "    restored:\n      runtimefs: {}\n      memory: {MEM}\n      snapshot: {}\n",
            rootfs.display(),
            snap.display()
        );
    }
    y
}

/// faas-cli's deployment body for `image` with these labels and
/// annotations (proxy/deploy.go: service, image, envProcess, labels,
/// annotations, and the namespace of the gateway's default).
fn deployment(name: &str, image: &str, labels: Value, annotations: Value) -> String {
    json!({
        "service": name,
        "image": image,
        "namespace": "openfaas-fn",
        "envProcess": "",
        "labels": labels,
        "annotations": annotations,
        "envVars": null,
        "secrets": [],
        "constraints": null,
        "readOnlyRootFilesystem": false,
    })
    .to_string()
}

fn runtime(r: &str) -> Value {
    json!({"com.snapvm.runtime": r})
}

/// A client that speaks to /system/* as faas-cli does: JSON bodies, basic
/// auth when it has credentials.
struct Cli<'a> {
    d: &'a Daemon,
    auth: Option<String>,
}

impl Cli<'_> {
    fn req(&self, method: &str, path: &str, body: &str) -> Reply {
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &self.auth {
            h.push(("Authorization", a.as_str()));
        }
        http_with(&self.d.addr, method, path, &h, body.as_bytes())
    }

    /// `faas-cli deploy`: PUT, then POST when the PUT is answered 404.
    fn deploy(&self, body: &str) -> (u16, u16) {
        let put = self.req("PUT", "/system/functions", body);
        if put.status != 404 {
            return (put.status, 0);
        }
        let post = self.req("POST", "/system/functions", body);
        assert!(
            [200, 201, 202].contains(&post.status),
            "{}\n{}",
            post.body,
            self.d.log()
        );
        (404, post.status)
    }

    /// `faas-cli describe NAME`.
    fn describe(&self, name: &str) -> Reply {
        self.req(
            "GET",
            &format!("/system/function/{name}?namespace=openfaas-fn"),
            "",
        )
    }

    fn state(&self, name: &str) -> String {
        let r = self.describe(name);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["annotations"]["com.snapvm.state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_ready(&self, name: &str) {
        self.d.wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(30),
            |_| {
                let s = self.state(name);
                assert_ne!(s, "failed", "{}", self.describe(name).body);
                s == "ready"
            },
        );
    }

    /// `faas-cli list`: the names.
    fn list(&self) -> Vec<String> {
        let r = self.req("GET", "/system/functions", "");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// `faas-cli remove NAME`.
    fn remove(&self, name: &str) -> Reply {
        self.req(
            "DELETE",
            "/system/functions",
            &json!({"functionName": name}).to_string(),
        )
    }
}

/// `faas-cli invoke NAME`: POST with Content-Type text/plain (its default).
fn invoke(d: &Daemon, name: &str, body: &str) -> Reply {
    http_with(
        &d.addr,
        "POST",
        &format!("/function/{name}"),
        &[("Content-Type", "text/plain")],
        body.as_bytes(),
    )
}

/// The build directories of function `name` under the state dir.
fn builds(s: &Scratch, name: &str) -> Vec<String> {
    let dir = s.path("state/build");
    if !dir.exists() {
        return Vec::new();
    }
    dir_entries(&dir)
        .into_iter()
        .filter(|e| e.starts_with(&format!("{name}.")))
        .collect()
}

fn record(s: &Scratch, name: &str) -> PathBuf {
    s.path(&format!("state/functions/{name}.json"))
}

#[test]
fn faas_cli_deploys_lists_describes_invokes_scales_updates_and_removes() {
    let s = Scratch::new("prov-cli");
    let d = Daemon::start(&s, &config(&s, None), BUDGET, &[]);
    let cli = Cli { d: &d, auth: None };
    // `faas-cli login` checks the credentials with GET /system/functions.
    assert_eq!(cli.list(), ["declared"]);

    let t = Instant::now();
    let body = deployment(
        "hello",
        "hello.img",
        json!({"com.snapvm.runtime": "testguest", "team": "a"}),
        json!({"note": "x"}),
    );
    assert_eq!(cli.deploy(&body), (404, 202));
    assert!(
        record(&s, "hello").is_file(),
        "stored before it is answered"
    );
    let mut not_ready = 0;
    let first = loop {
        let r = invoke(&d, "hello", r#"{"name": "cli"}"#);
        if r.status == 200 {
            break r;
        }
        not_ready += 1;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains("prepared"));
        assert!(t.elapsed() < Duration::from_secs(30), "{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("deploy -> first answer: {} ms", t.elapsed().as_millis());
    assert_eq!(first.json(), json!({"message": "hello, cli"}));
    assert_eq!(first.header("x-start"), Some("cold-boot"));
    assert_eq!(cli.list(), ["declared", "hello"]);

    let st = cli.describe("hello").json();
    assert_eq!(st["name"], "hello");
    assert_eq!(st["image"], "hello.img");
    assert_eq!(st["namespace"], "openfaas-fn");
    assert_eq!(st["labels"]["team"], "a");
    assert_eq!(st["annotations"]["note"], "x");
    assert_eq!(st["annotations"]["com.snapvm.state"], "ready");
    assert_eq!(st["annotations"]["com.snapvm.source"], "api");
    // Every answered invocation counts, the 503s while preparing too.
    assert_eq!(st["invocationCount"], 1 + not_ready);
    assert_eq!(
        (st["replicas"].as_u64(), st["availableReplicas"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(cli.describe("nope").status, 404);
    // The OpenFaaS gateway's metrics beside snapvm's own.
    assert_eq!(
        d.metric(
            "gateway_function_invocation_total{function_name=\"hello.openfaas-fn\",code=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        d.metric(
            "gateway_functions_seconds_count{function_name=\"hello.openfaas-fn\",code=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        d.metric("gateway_service_count{function_name=\"hello.openfaas-fn\"}"),
        1.0
    );
    assert_eq!(
        d.metric("multivm_requests_total{function=\"hello\",code=\"200\"}"),
        1.0
    );

    // `faas-cli scale hello --replicas 2`: two warm VMs.
    let r = cli.req(
        "POST",
        "/system/scale-function/hello",
        r#"{"serviceName":"hello","replicas":2,"namespace":"openfaas-fn"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    d.wait_for("two warm VMs of hello", Duration::from_secs(20), |d| {
        d.vms()
            .iter()
            .filter(|v| v["function"] == "hello" && v["state"] == "idle")
            .count()
            == 2
    });
    let stored: Value =
        serde_json::from_slice(&std::fs::read(record(&s, "hello")).unwrap()).unwrap();
    assert_eq!(stored["min_idle"], 2);
    let old_vms: Vec<Value> = d.vms().iter().map(|v| v["id"].clone()).collect();

    // `faas-cli deploy` again with another image: PUT succeeds (an update);
    // the old version serves until the new one is ready, then its VMs go.
    let body = deployment("hello", "team/echo.img", runtime("testguest"), json!({}));
    assert_eq!(cli.deploy(&body), (202, 0));
    cli.wait_ready("hello");
    let r = invoke(&d, "hello", r#"{"echo": 1}"#);
    assert_eq!(r.json(), json!({"echo": 1}), "{}", d.log());
    d.wait_for(
        "the old version's VMs to stop",
        Duration::from_secs(10),
        |d| d.vms().iter().all(|v| !old_vms.contains(&v["id"])),
    );
    assert_eq!(builds(&s, "hello").len(), 1, "the old build is removed");

    // Declared functions are the config's.
    for (method, path, body) in [
        (
            "PUT",
            "/system/functions",
            deployment("declared", "hello.img", runtime("testguest"), json!({})),
        ),
        (
            "POST",
            "/system/functions",
            deployment("declared", "hello.img", runtime("testguest"), json!({})),
        ),
        (
            "DELETE",
            "/system/functions",
            json!({"functionName": "declared"}).to_string(),
        ),
        (
            "POST",
            "/system/scale-function/declared",
            json!({"serviceName": "declared", "replicas": 1}).to_string(),
        ),
    ] {
        let r = cli.req(method, path, &body);
        assert_eq!(r.status, 409, "{method} {path}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("config"),
            "{}",
            r.body
        );
    }
    assert_eq!(invoke(&d, "declared", "{}").status, 200);
    // POST of an existing function is refused; PUT is the update.
    let r = cli.req("POST", "/system/functions", &body);
    assert_eq!(r.status, 409, "{}", r.body);

    // `faas-cli remove hello`: VMs stopped, files gone, 404 after.
    let pids = d.firerunners();
    let r = cli.remove("hello");
    assert_eq!(r.status, 200, "{}", r.body);
    d.wait_for("hello's VMs to stop", Duration::from_secs(10), |d| {
        d.vms().iter().all(|v| v["function"] != "hello")
    });
    let left = d.firerunners();
    assert!(
        pids.iter().filter(|p| left.contains(p)).count() <= 1,
        "only declared's VM stays"
    );
    assert!(!record(&s, "hello").exists());
    assert!(builds(&s, "hello").is_empty(), "{:?}", builds(&s, "hello"));
    assert_eq!(invoke(&d, "hello", "{}").status, 404);
    assert_eq!(cli.describe("hello").status, 404);
    assert_eq!(cli.remove("hello").status, 404);
    assert_eq!(cli.list(), ["declared"]);

    let info = cli.req("GET", "/system/info", "").json();
    assert_eq!(info["provider"], "snapvm");
    assert!(info["version"]["release"].is_string());
    assert_eq!(
        cli.req("GET", "/system/namespaces", "").json(),
        json!(["openfaas-fn"])
    );
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn basic_auth_guards_system_routes_only() {
    let s = Scratch::new("prov-auth");
    let creds = s.path("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(creds.join("basic-auth-password"), "s3cret\n").unwrap();
    let d = Daemon::start(
        &s,
        &config(&s, None),
        BUDGET,
        &["--basic_auth_dir", creds.to_str().unwrap()],
    );
    // admin:s3cret, admin:wrong
    let good = Cli {
        d: &d,
        auth: Some("Basic YWRtaW46czNjcmV0".into()),
    };
    let bad = Cli {
        d: &d,
        auth: Some("Basic YWRtaW46d3Jvbmc=".into()),
    };
    let none = Cli { d: &d, auth: None };
    for c in [&bad, &none] {
        for (method, path) in [
            ("GET", "/system/functions"),
            ("POST", "/system/functions"),
            ("GET", "/system/function/declared"),
            ("GET", "/system/info"),
            ("POST", "/system/scale-function/x"),
        ] {
            let r = c.req(method, path, "{}");
            assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"snapvm\""));
        }
    }
    assert_eq!(good.list(), ["declared"]);
    let body = deployment("hello", "hello.img", runtime("testguest"), json!({}));
    assert_eq!(good.deploy(&body), (404, 202));
    good.wait_ready("hello");
    // Invocations, health and metrics stay open.
    assert_eq!(invoke(&d, "hello", "{}").status, 200);
    assert_eq!(invoke(&d, "declared", "{}").status, 200);
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.get("/metrics").status, 200);
    // So does the API's OpenAPI document, which is docs/openapi.yaml.
    let doc = d.get("/openapi.yaml");
    assert_eq!(doc.status, 200);
    assert_eq!(doc.header("content-type"), Some("application/yaml"));
    assert_eq!(doc.body, include_str!("../docs/openapi.yaml"));
    // Without credentials nothing was deployed or removed.
    assert_eq!(none.remove("hello").status, 401);
    assert_eq!(good.list(), ["declared", "hello"]);
}

#[test]
fn deployed_functions_survive_a_restart_and_are_removed_cleanly() {
    let s = Scratch::new("prov-restart");
    let cfg = config(&s, None);
    let d = Daemon::start(&s, &cfg, BUDGET, &[]);
    let cli = Cli { d: &d, auth: None };
    let body = deployment(
        "hello",
        "hello.img",
        runtime("testguest"),
        json!({"com.snapvm.min_idle": "1"}),
    );
    cli.deploy(&body);
    cli.wait_ready("hello");
    assert_eq!(
        invoke(&d, "hello", r#"{"name": "one"}"#).json(),
        json!({"message": "hello, one"})
    );
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");

    let d = Daemon::start(&s, &cfg, BUDGET, &[]);
    let cli = Cli { d: &d, auth: None };
    assert_eq!(cli.list(), ["declared", "hello"]);
    cli.wait_ready("hello");
    // min_idle 1 came back with it: a warm VM is waiting.
    d.wait_for("hello's warm VM", Duration::from_secs(20), |d| {
        d.vms()
            .iter()
            .any(|v| v["function"] == "hello" && v["state"] == "idle")
    });
    let r = invoke(&d, "hello", r#"{"name": "two"}"#);
    assert_eq!(r.json(), json!({"message": "hello, two"}));
    assert_eq!(r.header("x-start"), Some("warm"));
    assert_eq!(builds(&s, "hello").len(), 1);

    assert_eq!(cli.remove("hello").status, 200);
    d.wait_for("hello's VMs to stop", Duration::from_secs(10), |d| {
        d.vms().is_empty()
    });
    assert!(d.firerunners().is_empty());
    assert!(dir_entries(&s.path("state/functions")).is_empty());
    assert!(builds(&s, "hello").is_empty());
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    // And it stays removed.
    let d = Daemon::start(&s, &cfg, BUDGET, &[]);
    assert_eq!(Cli { d: &d, auth: None }.list(), ["declared"]);
}

#[test]
fn removal_answers_waiting_requests_and_stops_the_vms() {
    let s = Scratch::new("prov-remove");
    let d = Arc::new(Daemon::start(&s, &config(&s, None), BUDGET, &[]));
    let cli = Cli { d: &d, auth: None };
    let body = deployment(
        "spin",
        "spin.img",
        runtime("testguest"),
        json!({"com.snapvm.concurrency_limit": "1", "com.snapvm.request_timeout": "3s"}),
    );
    cli.deploy(&body);
    cli.wait_ready("spin");
    let busy = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || invoke(&d, "spin", "{}"))
    };
    d.wait_for("spin to run", Duration::from_secs(20), |d| {
        d.vms().iter().any(|v| v["state"] == "busy")
    });
    let queued = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || invoke(&d, "spin", "{}"))
    };
    d.wait_for("a queued request", Duration::from_secs(10), |d| {
        d.metric("multivm_queue_depth{function=\"spin\"}") == 1.0
    });
    let t = Instant::now();
    assert_eq!(cli.remove("spin").status, 200);
    let r = queued.join().unwrap();
    assert_eq!(r.status, 410, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("removed"),
        "{}",
        r.body
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered at once: {:?}",
        t.elapsed()
    );
    // The running request ends at its timeout, and its VM with it.
    let r = busy.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    d.wait_for("spin's VM to stop", Duration::from_secs(10), |d| {
        d.vms().is_empty()
    });
    assert!(d.firerunners().is_empty());
    assert_eq!(d.metric("multivm_memory_used_mib"), 0.0);
}

#[test]
fn an_update_lets_the_request_in_flight_finish_on_the_old_version() {
    let s = Scratch::new("prov-update");
    let d = Arc::new(Daemon::start(&s, &config(&s, None), BUDGET, &[]));
    let cli = Cli { d: &d, auth: None };
    // The old version sleeps as long as a request asks; the new one echoes.
    cli.deploy(&deployment(
        "gen",
        "sleep.img",
        runtime("testguest"),
        json!({}),
    ));
    cli.wait_ready("gen");
    let in_flight = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || invoke(&d, "gen", r#"{"ms": 3000}"#))
    };
    d.wait_for(
        "the old version's VM to be busy",
        Duration::from_secs(20),
        |d| {
            d.vms()
                .iter()
                .any(|v| v["function"] == "gen" && v["state"] == "busy")
        },
    );
    let old_vm = d.vms()[0]["id"].clone();

    let body = deployment("gen", "team/echo.img", runtime("testguest"), json!({}));
    assert_eq!(cli.deploy(&body), (202, 0));
    cli.wait_ready("gen");
    let r = invoke(&d, "gen", r#"{"ms": 5}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"ms": 5}), "the new version answers");
    assert_ne!(r.header("x-vm-id"), Some(old_vm.to_string().as_str()));
    assert!(
        !in_flight.is_finished(),
        "the new version answered while the old request was still running"
    );
    assert!(
        d.vms()
            .iter()
            .any(|v| v["id"] == old_vm && v["state"] == "busy"),
        "the update left the old VM serving its request: {:?}",
        d.vms()
    );

    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"slept_ms": 3000}),
        "answered by the old version"
    );
    assert_eq!(r.header("x-vm-id"), Some(old_vm.to_string().as_str()));
    // Once its request is done the old VM stops; only the new one is left.
    d.wait_for(
        "the old version's VM to stop",
        Duration::from_secs(10),
        |d| d.vms().iter().all(|v| v["id"] != old_vm),
    );
    let vms = d.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(d.firerunners().len(), 1);
    assert_eq!(d.metric("multivm_memory_used_mib"), (MEM + 8) as f64);
    assert_eq!(builds(&s, "gen").len(), 1, "the old build is removed");
    // And the next requests keep going to the new version's VM.
    for i in 0..3 {
        let r = invoke(&d, "gen", &format!(r#"{{"ms": {i}}}"#));
        assert_eq!(r.json(), json!({"ms": i}));
        assert_eq!(r.header("x-start"), Some("warm"));
    }
}

#[test]
fn bad_input_on_every_system_route_is_a_4xx_and_registers_nothing() {
    let s = Scratch::new("prov-bad");
    let d = Daemon::start(&s, &config(&s, None), BUDGET, &[]);
    let cli = Cli { d: &d, auth: None };
    let dep = |name: &str, image: &str| deployment(name, image, runtime("testguest"), json!({}));
    let long = "a".repeat(1000);
    let huge = "x".repeat(10 << 20);
    let cases: Vec<(&str, String, String, u16)> = vec![
        ("POST", "/system/functions".into(), "{not json".into(), 400),
        ("POST", "/system/functions".into(), "".into(), 400),
        ("POST", "/system/functions".into(), r#"{"service": 7, "image": "hello.img"}"#.into(), 400),
        ("POST", "/system/functions".into(), r#"{"service": "a", "image": ["x"]}"#.into(), 400),
        ("POST", "/system/functions".into(), r#"{"service":"a","image":"hello.img","labels":"x"}"#.into(), 400),
        ("POST", "/system/functions".into(), dep("a/b", "hello.img"), 400),
        ("POST", "/system/functions".into(), dep("..", "hello.img"), 400),
        ("POST", "/system/functions".into(), dep("a\u{0}", "hello.img"), 400),
        ("POST", "/system/functions".into(), dep(&long, "hello.img"), 400),
        ("PUT", "/system/functions".into(), dep(&long, "hello.img"), 400),
        ("POST", "/system/functions".into(), dep("a", "missing.img"), 400),
        ("POST", "/system/functions".into(), dep("a", "../declared.img"), 400),
        ("POST", "/system/functions".into(), dep("a", "/etc/passwd"), 400),
        ("POST", "/system/functions".into(), dep("a", "team"), 400),
        ("POST", "/system/functions".into(), dep("a", &long), 400),
        ("POST", "/system/functions".into(), deployment("a", "hello.img", runtime("cobol"), json!({})), 400),
        ("POST", "/system/functions".into(), deployment("a", "hello.img", json!({}), json!({})), 400),
        ("POST", "/system/functions".into(), deployment("a", "hello.img", runtime("testguest"), json!({"com.snapvm.min_idle": "9"})), 400),
        ("POST", "/system/functions".into(), deployment("a", "hello.img", runtime("testguest"), json!({"com.snapvm.min_idle": "lots"})), 400),
        ("POST", "/system/functions".into(), json!({"service": "a", "image": "hello.img", "namespace": "other"}).to_string(), 400),
        ("POST", "/system/functions".into(), json!({"service": "a", "image": "hello.img", "limits": {"memory": "64Gi"}, "labels": runtime("testguest")}).to_string(), 400),
        ("POST", "/system/functions".into(), huge.clone(), 413),
        ("PUT", "/system/functions".into(), huge.clone(), 413),
        ("PUT", "/system/functions".into(), dep("ghost", "hello.img"), 404),
        ("DELETE", "/system/functions".into(), "{".into(), 400),
        ("DELETE", "/system/functions".into(), r#"{"functionName": 3}"#.into(), 400),
        ("DELETE", "/system/functions".into(), r#"{"functionName": "../x"}"#.into(), 400),
        ("DELETE", "/system/functions".into(), r#"{"functionName": "ghost"}"#.into(), 404),
        ("DELETE", "/system/functions".into(), huge.clone(), 413),
        ("GET", "/system/function/..".into(), "".into(), 400),
        ("GET", "/system/function/a%2Fb".into(), "".into(), 400),
        ("GET", "/system/function/a%00".into(), "".into(), 400),
        ("GET", format!("/system/function/{long}"), "".into(), 400),
        ("GET", "/system/function/ghost".into(), "".into(), 404),
        ("GET", "/system/functions?namespace=kube-system".into(), "".into(), 400),
        ("POST", "/system/scale-function/ghost".into(), r#"{"replicas": 1}"#.into(), 404),
        ("POST", "/system/scale-function/declared".into(), "nope".into(), 400),
        ("POST", "/system/scale-function/declared".into(), r#"{"replicas": -1}"#.into(), 400),
        ("POST", "/system/scale-function/..".into(), r#"{"replicas": 1}"#.into(), 400),
        ("POST", "/system/scale-function/x".into(), huge.clone(), 413),
        ("GET", "/system/scale-function/x".into(), "".into(), 405),
        ("PATCH", "/system/functions".into(), "{}".into(), 405),
        ("POST", "/system/info".into(), "{}".into(), 405),
        ("GET", "/system/nothing".into(), "".into(), 404),
    ];
    for (method, path, body, want) in &cases {
        let r = cli.req(method, path, body);
        let shown = &path[..path.len().min(60)];
        assert_eq!(r.status, *want, "{method} {shown}: {}", r.body);
        let why = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(why.len() > 10, "{method} {shown}: no reason: {}", r.body);
        assert_eq!(d.get("/healthz").status, 200, "after {method} {shown}");
    }
    assert_eq!(cli.list(), ["declared"]);
    assert!(dir_entries(&s.path("state/functions")).is_empty());
    assert!(dir_entries(&s.path("state/build")).is_empty());
    assert_eq!(invoke(&d, "a", "{}").status, 404);
    assert_eq!(d.metric("multivm_memory_used_mib"), 0.0);
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn a_runtime_with_a_language_snapshot_prepares_a_diff_layer_and_restores() {
    let s = Scratch::new("prov-snap");
    let base = s.path("snap/base");
    let cfg = config(&s, Some(&base));
    // The language snapshot: testguest's first snapshot point comes before
    // it reads its appfs.
    let mut cmd = std::process::Command::new(common::firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(s.path("rootfs.img"))
        .arg("--appfs")
        .arg(s.path("declared.img"))
        .args(["--mem_size", &MEM.to_string(), "--dump_dir"])
        .arg(&base)
        .arg("--console")
        .arg(s.path("base.log"));
    let made = common::run_with_deadline(cmd, Duration::from_secs(60));
    assert_eq!(made.code(), Some(0), "{}", made.stderr);

    let d = Daemon::start(&s, &cfg, BUDGET, &[]);
    let cli = Cli { d: &d, auth: None };
    // A memory limit other than the snapshot's cannot restore from it.
    let limited = json!({"service": "snap", "image": "team/echo.img",
        "labels": runtime("restored"), "limits": {"memory": "64Mi"}});
    let r = cli.req("POST", "/system/functions", &limited.to_string());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("snapshot"));

    cli.deploy(&deployment(
        "snap",
        "team/echo.img",
        runtime("restored"),
        json!({}),
    ));
    cli.wait_ready("snap");
    let build = builds(&s, "snap");
    assert_eq!(build.len(), 1);
    assert!(s
        .path(&format!("state/build/{}/diff/snapshot.json", build[0]))
        .is_file());
    let r = invoke(&d, "snap", r#"{"from": "a diff layer"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(r.json(), json!({"from": "a diff layer"}));
    assert_eq!(r.header("x-start"), Some("cold-restore"));
}

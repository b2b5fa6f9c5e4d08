//! The local demo signs users in: `hack/demo.sh up` (what `make demo` runs) starts the
//! control plane, the operator, a proxy, a connector, the demo OpenID provider and two
//! apps, exactly as a developer gets them; a real headless Chromium, trusting only the
//! demo's CA, opens the app with sign-in, signs in as the demo user with a password, is
//! sent back by the MFA policy to step up, signs in with MFA and sees the page name the
//! user; the passthrough app still answers. `hack/demo.sh down` runs at the end, also
//! when the test fails.
//!
//! The demo listens on fixed ports of 127.0.0.1 (8443-8445, 18080, 18081) and uses the
//! control plane of `sallyport-cluster up` (one per cache directory): the test refuses
//! to run when one is already up, rather than take over or stop someone's demo. The
//! other e2e tests use free ports from the kernel's ephemeral range and their own
//! control planes, so they do not collide with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sallyport_e2e::browser::{Browser, BrowserConfig};
use sallyport_e2e::controlplane::cache_root;
use sallyport_e2e::dataplane::StepError;
use sallyport_e2e::sign_in::check;

const WHOAMI_HOST: &str = "whoami.demo.sallyport.test";
const WHOAMI_URL: &str = "https://whoami.demo.sallyport.test:8443/";
const HELLO_HOST: &str = "hello.demo.sallyport.test";
const HELLO_URL: &str = "https://hello.demo.sallyport.test:8443/";
const ISSUER: &str = "https://127.0.0.1:8445";
const MFA_ACR: &str = "urn:sallyport:acr:mfa";
const DEMO_USER: &str = "demo";
const DEMO_PASSWORD: &str = "sallyport-demo";

/// The demo, started by `hack/demo.sh up`; dropping it runs `hack/demo.sh down`.
struct Demo {
    repo: PathBuf,
    cache: PathBuf,
    target: PathBuf,
}

impl Demo {
    /// The script run with the shared caches: `SALLYPORT_CACHE` as the harness finds it,
    /// and the target directory this test was built in (so that its cargo builds are
    /// no-ops after `make e2e`'s).
    fn script(&self, action: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(self.repo.join("hack/demo.sh"))
            .arg(action)
            .current_dir(&self.repo)
            .env("SALLYPORT_CACHE", &self.cache)
            .env("CARGO_TARGET_DIR", &self.target);
        command
    }

    /// The demo's state directory.
    fn dir(&self) -> PathBuf {
        self.cache.join("demo")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        match self.script("down").output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "hack/demo.sh down failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("cannot run hack/demo.sh down: {e}"),
        }
    }
}

/// The last lines of the demo's log `name` (e.g. `proxy.log`), for a failure message.
fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| format!("(cannot read {name}: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(30);
    format!("--- {name}\n{}", lines[start..].join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_signs_in_its_user_with_mfa_step_up_and_serves_the_passthrough_app()
-> Result<(), StepError> {
    let repo = sallyport_e2e::manifests::e2e_dir()
        .parent()
        .ok_or("the e2e crate has no parent directory")?
        .to_path_buf();
    let cache = cache_root()?;
    // <target>/debug/sallyport-cluster
    let target = Path::new(env!("CARGO_BIN_EXE_sallyport-cluster"))
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the target directory from the sallyport-cluster binary's path")?
        .to_path_buf();
    let local = cache.join("cluster/local");
    check(
        !local.join("supervisor.pid").exists() && !cache.join("demo/operator.pid").exists(),
        format!(
            "a local control plane or demo is already up ({} or {}): stop it with `make demo-down` \
             (or `make cluster-down`) before this test, which would otherwise take it over",
            local.display(),
            cache.join("demo").display()
        ),
    )?;

    // The guard first: a start that fails half-way is cleaned up too.
    let demo = Demo {
        repo,
        cache,
        target,
    };
    let up = tokio::task::spawn_blocking({
        let mut command = demo.script("up");
        move || command.output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&up.stderr).into_owned();
    check(
        up.status.success(),
        format!(
            "hack/demo.sh up failed ({}):\n{stdout}\n{stderr}\n{}\n{}\n{}",
            up.status,
            log_tail(&demo.dir(), "proxy.log"),
            log_tail(&demo.dir(), "idp.log"),
            log_tail(&demo.dir(), "operator.log")
        ),
    )?;
    // What it prints: the URLs, the credentials, the CA to trust, how to resolve.
    let ca_file = demo.dir().join("ca.crt");
    for expected in [
        WHOAMI_URL,
        HELLO_URL,
        &format!("user \"{DEMO_USER}\", password \"{DEMO_PASSWORD}\""),
        &ca_file.display().to_string(),
        "--host-resolver-rules",
        "make demo-down",
    ] {
        check(
            stdout.contains(expected),
            format!("hack/demo.sh up does not print {expected:?}:\n{stdout}"),
        )?;
    }
    let ca_pem = std::fs::read_to_string(&ca_file)?;

    let browser = Browser::start(
        &BrowserConfig::default()
            .trust_ca("Sallyport demo CA", &ca_pem)
            .resolve(WHOAMI_HOST, "127.0.0.1")
            .resolve(HELLO_HOST, "127.0.0.1"),
    )
    .await?;
    let on_provider_login = |url: &url::Url| {
        url.as_str().starts_with(ISSUER) && url.path().starts_with("/interaction/")
    };

    // A password only: the policy requires MFA, so the proxy sends the browser back to
    // the provider asking for the MFA acr.
    browser.goto(&format!("{WHOAMI_URL}team/page?x=1")).await?;
    let first_login = browser
        .wait_for_url("the demo provider's login page", on_provider_login)
        .await?;
    browser.sign_in(DEMO_USER, DEMO_PASSWORD, false).await?;
    let second_login = browser
        .wait_for_url("the provider's login page again (step-up to MFA)", |url| {
            on_provider_login(url) && url != &first_login
        })
        .await?;
    let requested = browser.text_of("#acr-values").await?;
    check(
        requested.contains(MFA_ACR),
        format!("the step-up asks for {MFA_ACR}: {requested:?} ({second_login})"),
    )?;

    // With MFA: back on the app, whose page names the user from the identity headers.
    browser.sign_in(DEMO_USER, DEMO_PASSWORD, true).await?;
    let landed = browser
        .wait_for_url("back on the demo app", |url| {
            url.host_str() == Some(WHOAMI_HOST) && !url.path().starts_with("/.sallyport/")
        })
        .await?;
    check(
        landed.path() == "/team/page" && landed.query() == Some("x=1"),
        format!("landed on {landed}, not the link asked for"),
    )?;
    let page = browser.page_text().await?;
    check(
        page.contains(&format!("Signed in as {DEMO_USER} (Demo User)"))
            && page.contains("demo@demo.sallyport.test")
            && page.contains("staff,engineering")
            && page.contains(MFA_ACR),
        format!("the demo app's page does not show the signed-in user:\n{page}"),
    )?;

    // The passthrough app still answers, without sign-in.
    browser.goto(HELLO_URL).await?;
    let hello = browser.page_text().await?;
    check(
        hello.contains("Hello from an internal app"),
        format!("the passthrough app's page:\n{hello}"),
    )?;
    browser.close().await?;
    drop(demo);
    Ok(())
}

//! A real browser for e2e tests: Debian's headless Chromium, driven over WebDriver by
//! Debian's `chromedriver`, with a fresh profile per [`Browser`].
//!
//! The WebDriver client is [`fantoccini`] rather than `thirtyfour`: it is small (plain
//! hyper 1 and tokio, which this crate already builds, and no TLS stack is needed to talk
//! to a chromedriver on loopback), maintained for years by one of tokio's authors, and
//! gives raw access to every WebDriver command that tests need (scripts, cookies, waits).
//!
//! **Trusting the test CA.** Chromium verifies certificates as it does for any user: the
//! test CAs ([`BrowserConfig::trust_ca`]) are added as trusted roots to an NSS database at
//! `$HOME/.pki/nssdb` (with `certutil` from Debian's `libnss3-tools`), where `$HOME` is a
//! fresh directory given to chromedriver and so to Chromium. Chain, name and validity are
//! all checked; a certificate from any other CA is refused (there is no
//! `--ignore-certificate-errors` of any kind, and `acceptInsecureCerts` is false).
//!
//! Host names other than IP addresses are mapped to loopback with Chromium's
//! `--host-resolver-rules` ([`BrowserConfig::resolve`]); nothing leaves the machine.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::dataplane::free_port;
use crate::process::{OwnedProcess, ProcessError};

/// Where Debian installs Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The flags every test browser runs with (besides `--user-data-dir` and the resolver
/// rules).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--password-store=basic",
    "--window-size=1280,900",
];

/// How long chromedriver and Chromium may take to start, and a page to load.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The browser could not be started or a step in it failed.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// A program is not installed.
    #[error("{program} is not installed: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// How to get it.
        hint: &'static str,
    },
    /// A file or directory could not be made.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `certutil` failed.
    #[error("certutil {args:?} failed: {output}")]
    Certutil {
        /// Its arguments.
        args: Vec<String>,
        /// What it printed.
        output: String,
    },
    /// chromedriver could not be started.
    #[error("cannot start chromedriver: {0}")]
    Start(#[from] ProcessError),
    /// No free port.
    #[error("no free loopback port for chromedriver: {0}")]
    Port(std::io::Error),
    /// The WebDriver session could not be created.
    #[error(
        "cannot open a Chromium session through chromedriver: {source}; chromedriver said:\n{output}"
    )]
    Session {
        /// Why.
        source: fantoccini::error::NewSessionError,
        /// chromedriver's output.
        output: String,
    },
    /// A WebDriver command failed.
    #[error("{what} failed: {source}")]
    Command {
        /// Which command.
        what: String,
        /// Why.
        source: fantoccini::error::CmdError,
    },
    /// The browser refused the server's certificate.
    #[error("the browser refused the certificate of {url}: {code}")]
    Certificate {
        /// The URL opened.
        url: String,
        /// Chromium's error, e.g. `NET::ERR_CERT_AUTHORITY_INVALID`.
        code: String,
    },
    /// A wait ran out.
    #[error("{what}: not within {within:?}; the page is now {url} and shows:\n{text}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        within: Duration,
        /// The page's URL then.
        url: String,
        /// The page's text then.
        text: String,
    },
    /// A script returned something else than expected.
    #[error("{what} returned unexpected JSON: {source}")]
    Json {
        /// Which script.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// How to start a [`Browser`].
#[derive(Debug, Clone, Default)]
pub struct BrowserConfig {
    trusted_cas: Vec<(String, String)>,
    resolver_rules: Vec<String>,
}

impl BrowserConfig {
    /// Trusts the CA certificate `pem` (named `name` in the NSS database) for server
    /// certificates.
    pub fn trust_ca(mut self, name: &str, pem: &str) -> Self {
        self.trusted_cas.push((name.to_owned(), pem.to_owned()));
        self
    }

    /// Resolves host name `host` to `ip` (e.g. `127.0.0.1`): the browser uses it in URLs,
    /// `Host` and SNI, and connects to `ip` on the URL's port.
    pub fn resolve(mut self, host: &str, ip: &str) -> Self {
        self.resolver_rules.push(format!("MAP {host} {ip}"));
        self
    }
}

/// A browser cookie as WebDriver reports it (for the current page's origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowserCookie {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
    /// Its domain, as the browser stored it.
    pub domain: Option<String>,
    /// Its path.
    pub path: Option<String>,
    /// Whether it is `Secure`.
    pub secure: bool,
    /// Whether it is `HttpOnly`.
    pub http_only: bool,
    /// Its `SameSite` (`Strict`, `Lax` or `None`), when reported.
    pub same_site: Option<String>,
    /// When it expires (Unix seconds); `None` for a session cookie.
    pub expires: Option<i64>,
}

/// What a `fetch()` run in the page got back ([`Browser::fetch`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct FetchOutcome {
    /// The final status (0 when the request failed, e.g. blocked by CORS).
    pub status: u16,
    /// The final URL after redirects.
    pub url: String,
    /// Whether a redirect was followed.
    pub redirected: bool,
    /// The `fetch` response type (`basic`, `cors`, `opaqueredirect`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The body as text.
    pub body: String,
    /// The error message when the request failed.
    pub error: Option<String>,
}

/// A headless Chromium with a fresh profile, driven over WebDriver. Dropping it ends the
/// session, chromedriver and every Chromium process of its profile.
pub struct Browser {
    client: Client,
    driver: Option<OwnedProcess>,
    driver_port: u16,
    session_id: Option<String>,
    profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("profile", &self.profile.path())
            .finish_non_exhaustive()
    }
}

/// The absolute path of `program` on PATH, if it is there.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile that trusts the
    /// configured CAs.
    pub async fn start(config: &BrowserConfig) -> Result<Self, BrowserError> {
        let chromium = Path::new(CHROMIUM);
        if !chromium.is_file() {
            return Err(missing("chromium"));
        }
        let chromedriver = find_program("chromedriver").ok_or_else(|| missing("chromedriver"))?;
        let profile = tempfile::Builder::new()
            .prefix("sallyport-browser-")
            .tempdir()
            .map_err(|source| BrowserError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        let home = profile.path().join("home");
        let user_data = profile.path().join("user-data");
        trust_cas(&home, &config.trusted_cas)?;

        let port = free_port().map_err(BrowserError::Port)?;
        let port_arg = format!("--port={port}");
        let home_env = home.display().to_string();
        let driver = OwnedProcess::start_program(
            &chromedriver,
            &[&port_arg, "--log-level=WARNING"],
            &[("HOME", &home_env)],
            true,
        )?;

        let mut args: Vec<String> = CHROMIUM_FLAGS
            .iter()
            .map(|flag| (*flag).to_owned())
            .collect();
        args.push(format!("--user-data-dir={}", user_data.display()));
        if !config.resolver_rules.is_empty() {
            args.push(format!(
                "--host-resolver-rules={}",
                config.resolver_rules.join(", ")
            ));
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("acceptInsecureCerts".into(), json!(false));
        capabilities.insert("pageLoadStrategy".into(), json!("normal"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let client = loop {
            let attempt = ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await;
            match attempt {
                Ok(client) => break client,
                // chromedriver is not listening yet.
                Err(fantoccini::error::NewSessionError::FailedC(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    return Err(BrowserError::Session {
                        source,
                        output: driver.output(),
                    });
                }
            }
        };
        let session_id = client.session_id().await.ok().flatten();
        tracing::info!(profile = %profile.path().display(), "browser started");
        Ok(Self {
            client,
            driver: Some(driver),
            driver_port: port,
            session_id,
            profile,
        })
    }

    /// The WebDriver client, for anything these helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for the page to load. A certificate the browser does not
    /// trust fails with [`BrowserError::Certificate`] (Chromium shows its interstitial).
    pub async fn goto(&self, url: &str) -> Result<(), BrowserError> {
        self.client
            .goto(url)
            .await
            .map_err(command(format!("opening {url}")))?;
        // chromedriver reports a refused certificate as a loaded page: Chromium's
        // "Your connection is not private", which names the error as NET::ERR_CERT_*.
        let text = self.page_text().await?;
        if let Some(start) = text.find("NET::ERR_CERT_") {
            let code = text
                .get(start..)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_default()
                .to_owned();
            return Err(BrowserError::Certificate {
                url: url.to_owned(),
                code,
            });
        }
        Ok(())
    }

    /// The current page's URL.
    pub async fn current_url(&self) -> Result<url::Url, BrowserError> {
        self.client
            .current_url()
            .await
            .map_err(command("reading the current URL"))
    }

    /// The current page's visible text (`document.body.innerText`).
    pub async fn page_text(&self) -> Result<String, BrowserError> {
        let value = self
            .execute(
                "return document.body ? document.body.innerText : '';",
                Vec::new(),
            )
            .await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// The current page's title.
    pub async fn title(&self) -> Result<String, BrowserError> {
        self.client
            .title()
            .await
            .map_err(command("reading the title"))
    }

    /// Whether an element matching the CSS selector `css` is on the page now.
    pub async fn has(&self, css: &str) -> Result<bool, BrowserError> {
        let found = self
            .client
            .find_all(Locator::Css(css))
            .await
            .map_err(command(format!("looking for {css}")))?;
        Ok(!found.is_empty())
    }

    /// The text of the element matching `css`, waiting for it to appear.
    pub async fn text_of(&self, css: &str) -> Result<String, BrowserError> {
        let element = self.wait_for_element(css).await?;
        element
            .text()
            .await
            .map_err(command(format!("reading the text of {css}")))
    }

    /// Types `value` into the field matching `css` (cleared first), waiting for it to
    /// appear.
    pub async fn fill(&self, css: &str, value: &str) -> Result<(), BrowserError> {
        let element = self.wait_for_element(css).await?;
        element
            .clear()
            .await
            .map_err(command(format!("clearing {css}")))?;
        element
            .send_keys(value)
            .await
            .map_err(command(format!("typing into {css}")))
    }

    /// Clicks the element matching `css`, waiting for it to appear.
    pub async fn click(&self, css: &str) -> Result<(), BrowserError> {
        let element = self.wait_for_element(css).await?;
        element
            .click()
            .await
            .map_err(command(format!("clicking {css}")))
    }

    /// Signs in on the OpenID provider's login page (see [`crate::oidc`]), which must be
    /// the current page or be reached by redirects: types `username` and `password`, ticks
    /// "MFA" when `mfa` is set, submits, and waits until the browser has left the form's
    /// page (to wherever the provider sends it; a refused password stays on the provider
    /// and shows `#error`).
    pub async fn sign_in(
        &self,
        username: &str,
        password: &str,
        mfa: bool,
    ) -> Result<(), BrowserError> {
        self.fill("form#login #username", username).await?;
        self.fill("form#login #password", password).await?;
        if mfa {
            self.click("form#login #mfa").await?;
        }
        let before = self.current_url().await?;
        self.click("form#login #submit").await?;
        self.wait_for_url(&format!("leaving {before}"), |url| url != &before)
            .await?;
        Ok(())
    }

    /// Confirms RP-initiated logout on the provider's "Sign out" page and waits until the
    /// browser has left it.
    pub async fn confirm_sign_out(&self) -> Result<(), BrowserError> {
        let before = self.current_url().await?;
        self.click("#logout-yes").await?;
        self.wait_for_url(&format!("leaving {before}"), |url| url != &before)
            .await?;
        Ok(())
    }

    /// Waits until the current URL satisfies `accept`; `what` names it in the error.
    pub async fn wait_for_url(
        &self,
        what: &str,
        accept: impl Fn(&url::Url) -> bool,
    ) -> Result<url::Url, BrowserError> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let url = self.current_url().await?;
            if accept(&url) {
                return Ok(url);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.timeout(what).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs JavaScript `script` in the page (a function body; `arguments` holds `args`) and
    /// returns what it returns.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value, BrowserError> {
        self.client
            .execute(script, args)
            .await
            .map_err(command("running a script"))
    }

    /// Runs asynchronous JavaScript `script` in the page: its last argument is the callback
    /// to call with the result.
    pub async fn execute_async(
        &self,
        script: &str,
        args: Vec<Value>,
    ) -> Result<Value, BrowserError> {
        self.client
            .execute_async(script, args)
            .await
            .map_err(command("running an async script"))
    }

    /// Runs `fetch(url, init)` in the page, as the page's own scripts would (same cookies,
    /// CORS and redirect rules), and reports what came back.
    pub async fn fetch(&self, url: &str, init: Value) -> Result<FetchOutcome, BrowserError> {
        const SCRIPT: &str = r#"
            const [url, init, done] = arguments;
            fetch(url, init)
              .then(async (r) => done({ status: r.status, url: r.url, redirected: r.redirected,
                                        type: r.type, body: await r.text(), error: null }))
              .catch((e) => done({ status: 0, url, redirected: false, type: 'error', body: '',
                                   error: String(e) }));
        "#;
        let value = self
            .execute_async(SCRIPT, vec![Value::String(url.to_owned()), init])
            .await?;
        serde_json::from_value(value).map_err(|source| BrowserError::Json {
            what: format!("fetch({url})"),
            source,
        })
    }

    /// The cookies the browser would send to the current page.
    pub async fn cookies(&self) -> Result<Vec<BrowserCookie>, BrowserError> {
        let cookies = self
            .client
            .get_all_cookies()
            .await
            .map_err(command("reading cookies"))?;
        Ok(cookies
            .into_iter()
            .map(|cookie| BrowserCookie {
                name: cookie.name().to_owned(),
                value: cookie.value().to_owned(),
                domain: cookie.domain().map(str::to_owned),
                path: cookie.path().map(str::to_owned),
                secure: cookie.secure().unwrap_or(false),
                http_only: cookie.http_only().unwrap_or(false),
                same_site: cookie.same_site().map(|same_site| same_site.to_string()),
                expires: cookie
                    .expires_datetime()
                    .map(|expires| expires.unix_timestamp()),
            })
            .collect())
    }

    /// A PNG screenshot of the page, e.g. to look at when a test fails.
    pub async fn screenshot(&self) -> Result<Vec<u8>, BrowserError> {
        self.client
            .screenshot()
            .await
            .map_err(command("taking a screenshot"))
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(mut self) -> Result<(), BrowserError> {
        let result = self
            .client
            .clone()
            .close()
            .await
            .map_err(command("closing the session"));
        self.session_id = None;
        result
    }

    async fn wait_for_element(
        &self,
        css: &str,
    ) -> Result<fantoccini::elements::Element, BrowserError> {
        let found = self
            .client
            .wait()
            .at_most(START_TIMEOUT)
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(element) => Ok(element),
            Err(fantoccini::error::CmdError::WaitTimeout) => {
                Err(self.timeout(&format!("waiting for {css}")).await)
            }
            Err(source) => Err(BrowserError::Command {
                what: format!("looking for {css}"),
                source,
            }),
        }
    }

    async fn timeout(&self, what: &str) -> BrowserError {
        let url = self
            .current_url()
            .await
            .map_or_else(|e| format!("(unknown: {e})"), |url| url.to_string());
        let text = self
            .page_text()
            .await
            .unwrap_or_else(|e| format!("(unknown: {e})"));
        BrowserError::Timeout {
            what: what.to_owned(),
            within: START_TIMEOUT,
            url,
            text,
        }
    }

    /// Ends the session with a blocking `DELETE /session/<id>` (Chromium quits), since
    /// `Drop` cannot wait for the client's own asynchronous shutdown.
    fn delete_session(&self) {
        let Some(session_id) = &self.session_id else {
            return;
        };
        let address = SocketAddr::from(([127, 0, 0, 1], self.driver_port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{session_id} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.delete_session();
        if let Some(driver) = self.driver.take() {
            driver.stop();
        }
        kill_profile_processes(&self.profile.path().join("user-data"));
    }
}

/// SIGKILLs every process started with `--user-data-dir=<user_data>`: the Chromium
/// processes of one [`Browser`], should any outlive its session and chromedriver.
fn kill_profile_processes(user_data: &Path) {
    let marker = format!("--user-data-dir={}", user_data.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|byte| *byte == 0)
            .any(|arg| arg == marker.as_bytes())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Writes an NSS database at `<home>/.pki/nssdb` that trusts `cas` for TLS servers.
fn trust_cas(home: &Path, cas: &[(String, String)]) -> Result<(), BrowserError> {
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).map_err(|source| BrowserError::Write {
        path: nssdb.clone(),
        source,
    })?;
    let certutil = find_program("certutil").ok_or_else(|| missing("certutil"))?;
    let db = format!("sql:{}", nssdb.display());
    run_certutil(&certutil, &["-N", "-d", &db, "--empty-password"])?;
    for (index, (name, pem)) in cas.iter().enumerate() {
        let file = home.join(format!("ca-{index}.pem"));
        std::fs::write(&file, pem).map_err(|source| BrowserError::Write {
            path: file.clone(),
            source,
        })?;
        let file = file.display().to_string();
        run_certutil(
            &certutil,
            &["-A", "-d", &db, "-n", name, "-t", "C,,", "-i", &file],
        )?;
    }
    Ok(())
}

fn run_certutil(certutil: &Path, args: &[&str]) -> Result<(), BrowserError> {
    let failed = |output: String| BrowserError::Certutil {
        args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        output,
    };
    let output = std::process::Command::new(certutil)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

fn missing(program: &str) -> BrowserError {
    BrowserError::Missing {
        program: program.to_owned(),
        hint: "install Debian's chromium, chromium-driver and libnss3-tools (hack/install-test-packages.sh, as root)",
    }
}

fn command(what: impl Into<String>) -> impl FnOnce(fantoccini::error::CmdError) -> BrowserError {
    let what = what.into();
    move |source| BrowserError::Command { what, source }
}

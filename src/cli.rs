//! The admin commands (`issue`, `list`, `renew`, `revoke`): a client of the admin API that finds
//! its address and token from the same config and keys folder as the broker; and `token create`,
//! which writes a spawner token file and needs no running broker.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::admin::TunnelView;
use crate::config::Config;
use crate::credentials::AuthKind;
use crate::keys;
use crate::secret::Secret;

/// Where the admin API is and how to authenticate.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Secret,
    http: reqwest::Client,
}

impl Client {
    /// From the config, unless `url` or `token_file` override it.
    pub fn new(
        config: &Config,
        url: Option<&str>,
        token_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let mut addr = config.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        };
        let token_path = token_file.map_or_else(
            || config.keys_dir.join(keys::ADMIN_TOKEN_FILE),
            Path::to_path_buf,
        );
        // A token file given by hand may be a spawner token, group-readable by design.
        let token = match token_file {
            Some(path) => crate::tokens::read_scoped_file(path),
            None => keys::read_secret_file(&token_path),
        }
        .with_context(|| {
            format!(
                "reading the admin token (is the broker's keys_dir {}?)",
                config.keys_dir.display()
            )
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { base, token, http })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling the admin API at {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 400 {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned);
            bail!("admin API answered {status}: {msg}");
        }
        Ok((status, value))
    }

    /// `POST /api/v1/tunnels`.
    pub async fn issue(
        &self,
        user: &str,
        server: &str,
        ttl: Option<Duration>,
        public_key: Option<String>,
        auth: AuthKind,
    ) -> anyhow::Result<TunnelView> {
        let mut body = json!({"user": user, "server_name": server, "auth": auth.as_str()});
        if let Some(ttl) = ttl {
            body["ttl_seconds"] = json!(ttl.as_secs());
        }
        if let Some(k) = public_key {
            body["public_key"] = json!(k);
        }
        let (_, v) = self
            .call(reqwest::Method::POST, "/api/v1/tunnels", Some(body))
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// `GET /api/v1/tunnels`.
    pub async fn list(&self) -> anyhow::Result<Vec<TunnelView>> {
        let (_, v) = self
            .call(reqwest::Method::GET, "/api/v1/tunnels", None)
            .await?;
        Ok(serde_json::from_value(
            v.get("tunnels").cloned().unwrap_or(Value::Null),
        )?)
    }

    /// `GET /readyz`: whether the broker is serving.
    pub async fn ready(&self) -> anyhow::Result<bool> {
        let resp = self.http.get(format!("{}/readyz", self.base)).send().await;
        Ok(resp
            .with_context(|| format!("calling the admin API at {}", self.base))?
            .status()
            .is_success())
    }

    /// `POST /api/v1/tunnels/{id}/renew`.
    pub async fn renew(&self, id: &str, ttl: Option<Duration>) -> anyhow::Result<TunnelView> {
        let body = match ttl {
            Some(ttl) => json!({"ttl_seconds": ttl.as_secs()}),
            None => json!({}),
        };
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/tunnels/{id}/renew"),
                Some(body),
            )
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// `DELETE /api/v1/tunnels/{id}`.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/api/v1/tunnels/{id}"),
            None,
        )
        .await?;
        Ok(())
    }
}

/// Prints an issued tunnel for a person: what to give the job, never the key itself unless
/// asked to write it to a file.
pub fn print_issued(t: &TunnelView, key_file: Option<&Path>) -> anyhow::Result<()> {
    println!("tunnel   {}", t.id);
    println!("user     {}  server {:?}", t.user, t.server_name);
    println!("port     {}  (the hub port the job's -R lands on)", t.port);
    println!("expires  {}", t.expires_at);
    let host = t.ssh_host.as_deref().unwrap_or("HUB");
    match (key_file, &t.private_key) {
        (Some(path), Some(key)) => {
            keys::write_private_file(path, key.as_bytes())?;
            let kh = path.with_extension("known_hosts");
            keys::write_private_file(&kh, format!("{}\n", t.known_hosts).as_bytes())?;
            println!(
                "key      written to {} (known_hosts: {})",
                path.display(),
                kh.display()
            );
            println!(
                "job runs ssh -N -i {} -o UserKnownHostsFile={} -o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -o 'RekeyLimit=512M 30m' -R 0:127.0.0.1:NBPORT {}@{host} -p {}",
                path.display(),
                kh.display(),
                t.ssh_user,
                t.ssh_port
            );
        }
        (None, Some(_)) => {
            println!("key      not shown: pass --key-file PATH or --json to get the private key")
        }
        (_, None) if t.auth == AuthKind::Certificate => println!(
            "key      none: any valid certificate of the site's CA for {} publishes it (-R {}:127.0.0.1:NBPORT, or -R 0 when it is their only one waiting)",
            t.user, t.port
        ),
        (_, None) => println!("key      the job's own (public key given)"),
    }
    Ok(())
}

/// Prints broker health and the live tunnels, for `tunnelbot status`.
pub fn print_status(ready: bool, tunnels: &[TunnelView]) {
    let active: Vec<&TunnelView> = tunnels.iter().filter(|t| t.state == "active").collect();
    let connected = active.iter().filter(|t| t.connected).count();
    let route_errors = active.iter().filter(|t| t.route == "error").count();
    println!(
        "broker   {}  tunnels {} active, {} connected, {} route errors",
        if ready { "ready" } else { "NOT READY" },
        active.len(),
        connected,
        route_errors
    );
    println!(
        "{:<16} {:<10} {:>5} {:<20} {:<21} {:>10} {:>10} {:<10}",
        "USER", "SERVER", "PORT", "CONNECTED SINCE", "SOURCE", "TO JOB", "FROM JOB", "ROUTE"
    );
    for t in active {
        println!(
            "{:<16} {:<10} {:>5} {:<20} {:<21} {:>10} {:>10} {:<10}",
            t.user,
            t.server_name,
            t.port,
            t.connected_since.as_deref().unwrap_or("-"),
            t.peer.as_deref().unwrap_or("-"),
            t.bytes_to_job,
            t.bytes_from_job,
            t.route
        );
    }
}

/// Prints tunnels as a table.
pub fn print_table(tunnels: &[TunnelView]) {
    println!(
        "{:<36} {:<16} {:<10} {:>5} {:<8} {:<21} {:<20}",
        "ID", "USER", "SERVER", "PORT", "STATE", "PEER", "EXPIRES"
    );
    for t in tunnels {
        let peer = t.peer.as_deref().unwrap_or("-");
        println!(
            "{:<36} {:<16} {:<10} {:>5} {:<8} {:<21} {:<20}",
            t.id, t.user, t.server_name, t.port, t.state, peer, t.expires_at
        );
    }
}

/// A lifetime on the command line: whole seconds (`3600`) or a duration (`1h`, `90m`).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// `tunnelbot token create --scope spawner --group G [--name N]`: writes the token file (owned
/// by the keys folder's owner, the broker's user, when it exists) and says where it went and
/// whether members of `group` can reach it.
pub fn create_token(config: &Config, group: &str, name: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = config.tokens_dir();
    let owner = std::fs::metadata(&config.keys_dir)
        .map(|m| m.uid())
        .unwrap_or_else(|_| nix::unistd::getuid().as_raw());
    let path = crate::tokens::create_spawner_token(&dir, name.unwrap_or(group), group, owner)?;
    println!("{}", path.display());
    let gid = std::fs::metadata(&path)?.gid();
    if let Some(blocked) = crate::tokens::unreachable_ancestor(&path, gid) {
        eprintln!(
            "warning: members of group {group} cannot pass through {}: give the group search \
             permission (chgrp {group} DIR; chmod g+x DIR), or set admin.tokens_dir to a folder \
             they can reach, e.g. /etc/tunnelbot/tokens",
            blocked.display()
        );
    }
    Ok(())
}

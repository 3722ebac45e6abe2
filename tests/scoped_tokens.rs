//! Spawner tokens: `tunnelbot token create` writes one a non-root process in the group can
//! read while `admin.token` stays private; it manages tunnels; loose, wrong and deleted token
//! files are refused at the next request.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::TestBroker;
use reqwest::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_tunnelbot");
/// An existing group the test user `nobody` is put in with `setpriv`; no account is created.
const GROUP: &str = "daemon";

/// Runs `cat path` as `nobody` with `GROUP` as a supplementary group: a non-root hub process.
fn read_as_hub(path: &Path) -> anyhow::Result<Option<String>> {
    let gid = nix::unistd::Group::from_name(GROUP)?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| anyhow::anyhow!("no group {GROUP}"))?;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534"])
        .arg(format!("--groups={gid}"))
        .args(["--", "cat"])
        .arg(path)
        .output()?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

async fn call(
    broker: &TestBroker,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<u16> {
    let mut req = broker
        .http
        .request(method, broker.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    Ok(req.send().await?.status().as_u16())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
}

#[tokio::test]
async fn a_non_root_hub_in_the_group_uses_a_spawner_token_and_never_sees_the_admin_token()
-> anyhow::Result<()> {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to hand files to a group and to run as nobody");
        return Ok(());
    }
    let broker = TestBroker::start("").await?;
    let root = broker.dir.path();
    // The temporary folder stands in for /etc or /var/lib: passable, not listable.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    let config = root.join("tb.toml");
    std::fs::write(&config, common::base_config(root, broker.tunnel_ip, ""))?;
    let keys = root.join("keys");
    let create = || {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["token", "create", "--scope", "spawner", "--group", GROUP])
            .output()
    };

    // Default place, <keys_dir>/tokens: the 0700 keys folder stops the group, and it says so.
    let out = create()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(path, keys.join("tokens/spawner-daemon.token"));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains(&format!("cannot pass through {}", keys.display())),
        "{warning}"
    );
    assert_eq!(read_as_hub(&path)?, None);

    // Following the advice: the group may search the keys folder, and the broker keeps that.
    let gid = std::fs::metadata(&path)?.gid();
    std::os::unix::fs::chown(&keys, None, Some(gid))?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o710))?;
    tunnelbot::keys::Keys::load_or_create(&keys)?;
    assert_eq!(mode(&keys), 0o710);
    let out = create()?;
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((mode(&keys.join("tokens")), mode(&path)), (0o750, 0o640));
    assert_eq!(mode(&keys.join("admin.token")), 0o600);

    let token = read_as_hub(&path)?.expect("the hub reads its token");
    assert_eq!(read_as_hub(&keys.join("admin.token"))?, None);
    assert_eq!(read_as_hub(&keys.join("ssh_host_ed25519_key"))?, None);

    // The spawner token does everything the spawner needs.
    let (status, issued) = {
        let resp = broker
            .http
            .post(broker.url("/api/v1/tunnels"))
            .bearer_auth(&token)
            .json(&json!({"user": "hubuser"}))
            .send()
            .await?;
        (resp.status().as_u16(), resp.json::<Value>().await?)
    };
    assert_eq!(status, 201, "{issued}");
    let id = issued["id"].as_str().unwrap_or_default().to_owned();
    let one = format!("/api/v1/tunnels/{id}");
    assert_eq!(
        call(&broker, &token, Method::GET, "/api/v1/tunnels", None).await?,
        200
    );
    assert_eq!(call(&broker, &token, Method::GET, &one, None).await?, 200);
    let renew = format!("{one}/renew");
    assert_eq!(
        call(&broker, &token, Method::POST, &renew, None).await?,
        200
    );
    assert_eq!(
        call(&broker, &token, Method::DELETE, &one, None).await?,
        204
    );

    // Re-read at every request: a loose file is refused, a tight one works again, a deleted
    // one is revoked at once, and a recreated one replaces the old token.
    let list = "/api/v1/tunnels";
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    assert_eq!(call(&broker, &token, Method::GET, list, None).await?, 401);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))?;
    assert_eq!(call(&broker, &token, Method::GET, list, None).await?, 200);
    assert!(create()?.status.success());
    assert_eq!(call(&broker, &token, Method::GET, list, None).await?, 401);
    let token = read_as_hub(&path)?.expect("new token");
    assert_eq!(call(&broker, &token, Method::GET, list, None).await?, 200);
    std::fs::remove_file(&path)?;
    assert_eq!(call(&broker, &token, Method::GET, list, None).await?, 401);
    // The admin token is unaffected by any of it.
    assert_eq!(
        call(&broker, &broker.token, Method::GET, list, None).await?,
        200
    );

    // The CLI accepts a spawner token file (group-readable by design) for its calls. (Async:
    // the broker runs on this test's thread.)
    assert!(create()?.status.success());
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["list", "--json", "--admin-url"])
        .arg(broker.url(""))
        .arg("--token-file")
        .arg(&path)
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

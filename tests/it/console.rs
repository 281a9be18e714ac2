//! Issue 29: the web console, walked in a real browser along an operator's
//! paths (find an order and its mail, watch lag live, re-drive a dead
//! letter, reset a stopped group's offsets, replay a time range), its
//! security (read-only, the token, CSRF) and its answers to bad input.

use std::time::Duration;

use crate::console_browser::{Browser, Service};
use crate::harness::*;
use crate::mail::wait_for_mails;
use crate::smtp::SmtpServer;

const MAIL_GROUP: &str = "mail-service";

/// A session of the console for a script: its cookie and its CSRF token
/// (from a page's form), for requests a browser would not make.
struct Session {
    http: reqwest::Client,
    cookie: String,
    csrf: String,
}

impl Session {
    /// Opens the console as a browser on loopback does (a session cookie
    /// comes with the first page).
    async fn open(base: &str, bearer: Option<&str>) -> Session {
        let http = no_redirects();
        let mut request = http
            .get(format!("{base}/dead-letters"))
            .header("accept", "text/html");
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let cookie = response
            .headers()
            .get("set-cookie")
            .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string())
            .unwrap_or_default();
        let page = response.text().await.unwrap();
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .map(|rest| rest.split('"').next().unwrap().to_string())
            .unwrap_or_default();
        Session { http, cookie, csrf }
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(url)
            .header("cookie", &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

/// A client that shows redirects instead of following them (a refusal
/// stays a refusal, a login's cookie is seen).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A refused write: its path, its form, the status and code it gets.
type BadWrite<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, &'a str);

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

async fn committed(db: &TestDb, group: &str) -> Vec<Option<i64>> {
    let client = db.client().await;
    client
        .query(
            "SELECT committed_offset FROM group_partitions WHERE group_id = $1 ORDER BY topic, partition",
            &[&group],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The group's committed offsets summed: a reset would lower it (the live
/// mail worker may still commit an empty partition's first offset, 0).
async fn committed_sum(db: &TestDb, group: &str) -> i64 {
    committed(db, group).await.iter().flatten().sum()
}

async fn audit_entries(db: &TestDb) -> i64 {
    count(&db.client().await, "SELECT count(*) FROM console_audit").await
}

#[tokio::test]
async fn an_operator_finds_an_order_and_watches_its_mail_held_up_and_released_live() {
    let db = TestDb::migrated().await;
    let mut smtp = SmtpServer::start(&[]).await;
    let service = Service::start(&db, &smtp, &[]).await;
    let order = service.place_order("ada@example.com").await;
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;

    let browser = Browser::start("lookup").await;
    browser.goto(&format!("{}/", service.base)).await;
    browser.screenshot("overview").await;
    // One click from the overview: the id, then Find.
    browser.fill("input[name=q]", &order.to_string()).await;
    browser.click("form button[type=submit]").await;
    browser
        .wait_text("#mail [data-state]", "the order's mail to be sent", |t| {
            t == "sent"
        })
        .await;
    assert!(browser.text("#order").await.contains("ada@example.com"));
    assert!(browser.text("#events").await.contains("order-created"));
    browser.screenshot("order-sent").await;

    // The SMTP server stops: the overview shows the lag rise, live.
    smtp.stop().await;
    browser.goto(&format!("{}/", service.base)).await;
    let held = service.place_order("bob@example.com").await;
    let lag = format!("#groups tr[data-group='{MAIL_GROUP}'] td.lag");
    browser
        .wait_text(&lag, "the mail group's lag to rise without a reload", |t| {
            t != "0"
        })
        .await;
    browser.screenshot("lag-risen").await;

    // The held order's mail is pending, with the last error.
    let order_page = format!("{}/orders?q={held}", service.base);
    eventually(
        "the held mail to show an attempt",
        Duration::from_secs(30),
        || async {
            browser.goto(&order_page).await;
            let state = browser.text("#mail [data-state]").await;
            let error = browser
                .client
                .find(fantoccini::Locator::Css("#mail .last-error"))
                .await
                .ok();
            (state == "pending" && error.is_some()).then_some(())
        },
    )
    .await;
    // Its event is found although the mail worker has not read it yet.
    assert!(browser.text("#events").await.contains("order-created"));
    browser.screenshot("order-pending").await;

    // It starts again: the overview's lag returns to 0 without a reload.
    browser.goto(&format!("{}/", service.base)).await;
    browser
        .wait_text(&lag, "the overview to show the lag", |t| t != "0")
        .await;
    smtp.restart().await;
    browser
        .wait_text(&lag, "the mail group's lag to return to 0 live", |t| {
            t == "0"
        })
        .await;
    browser.screenshot("lag-back-to-0").await;
    browser.goto(&order_page).await;
    assert_eq!(browser.text("#mail [data-state]").await, "sent");
    browser.close().await;
    service.stop().await;
}

#[tokio::test]
async fn a_dead_letter_is_found_from_its_order_re_driven_once_and_mailed() {
    let db = TestDb::migrated().await;
    let mut smtp = SmtpServer::start(&["--reject", "nobody@example.com"]).await;
    let service = Service::start(&db, &smtp, &[]).await;
    let order = service.place_order("nobody@example.com").await;
    let client = db.client().await;
    eventually(
        "the rejected mail to become a dead letter",
        Duration::from_secs(30),
        || async {
            (count(
                &client,
                "SELECT count(*) FROM dead_letters WHERE status = 'parked'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    // The mailbox exists again; the dead letter waits for an operator.
    smtp.restart_with(&[]).await;

    let browser = Browser::start("dead-letter").await;
    browser
        .goto(&format!("{}/orders?q={order}", service.base))
        .await;
    assert_eq!(
        browser.text("#mail [data-state]").await,
        "failed: dead letter"
    );
    browser.screenshot("order-dead-letter").await;
    browser.click("#mail a").await;
    browser
        .wait_text("#matching", "the dead letter's page", |t| {
            t.starts_with('1')
        })
        .await;
    browser.screenshot("dead-letters").await;
    browser.click("#dead-letters input[type=checkbox]").await;
    browser.click("#act button[value=retry]").await;
    let preview = browser
        .wait_text("#preview-count", "the re-drive's preview", |_| true)
        .await;
    assert!(preview.starts_with("1 parked dead letter(s)"), "{preview}");
    browser.screenshot("re-drive-preview").await;
    browser.click("#confirm button[type=submit]").await;
    let done = browser
        .wait_text("#done", "the re-drive's result", |_| true)
        .await;
    assert!(done.contains("Re-drove 1"), "{done}");

    // Confirming the same preview again delivers nothing more: it is no
    // longer parked.
    browser.client.back().await.unwrap();
    browser.click("#confirm button[type=submit]").await;
    let again = browser
        .wait_text("#done", "the second re-drive's result", |t| {
            t.contains("Re-drove 0")
        })
        .await;
    assert!(
        again.contains("1 of the 1 previewed were no longer parked"),
        "{again}"
    );

    let order_page = format!("{}/orders?q={order}", service.base);
    eventually(
        "the re-driven mail to be sent",
        Duration::from_secs(30),
        || async {
            browser.goto(&order_page).await;
            (browser.text("#mail [data-state]").await == "sent").then_some(())
        },
    )
    .await;
    browser.screenshot("order-sent-after-re-drive").await;
    wait_for_mails(&smtp, 1, Duration::from_secs(10)).await;
    // Published once: one retry of the record in the log (the outbox row
    // and its retry link are gone once relayed).
    let retries: i64 = client
        .query_one(
            "SELECT count(*) FROM event_log WHERE key = $1 AND headers ? 'outbox-relay-retry-of'",
            &[&order.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retries, 1, "published once");
    browser.goto(&format!("{}/audit", service.base)).await;
    assert!(browser.text("#audit").await.contains("retry-dead-letters"));
    browser.screenshot("audit").await;
    browser.close().await;
    service.stop().await;
}

#[tokio::test]
async fn a_stopped_groups_offsets_are_reset_after_a_preview_and_a_confirm() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    // The console's process has no mail worker; the worker runs on its own.
    let service = Service::start_roles(&db, Some(&smtp), "api,relay,console", &[]).await;
    for i in 0..5 {
        service.place_order(&format!("c{i}@example.com")).await;
    }
    let mut worker = binary(&db)
        .args([
            "serve",
            "--roles",
            "mail",
            "--smtp-url",
            &smtp.url(),
            "--session-timeout-secs",
            "2",
        ])
        .spawn()
        .unwrap();
    wait_for_mails(&smtp, 5, Duration::from_secs(30)).await;
    wait_until_group_caught_up(&db, MAIL_GROUP, "order-created").await;

    let browser = Browser::start("reset").await;
    browser
        .goto(&format!("{}/groups/{MAIL_GROUP}", service.base))
        .await;
    browser.screenshot("group-live").await;
    // While a member is live: the CLI's refusal, and no confirm.
    browser.click("#reset button[type=submit]").await;
    let refusal = browser
        .wait_text(".error[data-code=group_active]", "the refusal", |_| true)
        .await;
    assert!(
        refusal.contains("Assignments can only be reset if the group 'mail-service' is inactive"),
        "{refusal}"
    );
    assert_eq!(browser.count("#confirm").await, 0);

    worker.kill().await.unwrap();
    let client = db.client().await;
    eventually(
        "the worker's session to end",
        Duration::from_secs(30),
        || async {
            (count(
                &client,
                "SELECT count(*) FROM group_members WHERE heartbeat_at + session_timeout > now()",
            )
            .await
                == 0)
                .then_some(())
        },
    )
    .await;
    let before = committed(&db, MAIL_GROUP).await;
    assert!(before.iter().flatten().sum::<i64>() == 5, "{before:?}");

    // Bad input first: a clear message, nothing changed.
    browser
        .goto(&format!("{}/groups/{MAIL_GROUP}", service.base))
        .await;
    browser
        .client
        .find(fantoccini::Locator::Css(
            "#reset select[name=to] option[value=offset]",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.fill("#reset input[name=value]", "abc").await;
    browser.click("#reset button[type=submit]").await;
    let message = browser
        .wait_text(".error", "the refusal of a non-numeric offset", |_| true)
        .await;
    assert!(message.contains("is not an offset"), "{message}");
    browser.screenshot("reset-bad-offset").await;
    assert_eq!(committed(&db, MAIL_GROUP).await, before);

    browser
        .goto(&format!("{}/groups/{MAIL_GROUP}", service.base))
        .await;
    browser.click("#reset button[type=submit]").await; // to the earliest, every topic
    browser.wait_text("#preview", "the preview", |_| true).await;
    let new_offsets: Vec<String> = {
        let cells = browser
            .client
            .find_all(fantoccini::Locator::Css("#preview td.new"))
            .await
            .unwrap();
        let mut texts = Vec::new();
        for c in cells {
            texts.push(c.text().await.unwrap());
        }
        texts
    };
    assert_eq!(new_offsets.len(), 8);
    assert!(new_offsets.iter().all(|o| o == "0"), "{new_offsets:?}");
    browser.screenshot("reset-preview").await;
    // Nothing moved before the confirm.
    assert_eq!(committed(&db, MAIL_GROUP).await, before);
    browser.click("#confirm button[type=submit]").await;
    let done = browser
        .wait_text("#done", "the reset's result", |_| true)
        .await;
    assert!(done.contains("Moved 8 partition offsets"), "{done}");
    browser.screenshot("reset-done").await;
    let after = committed(&db, MAIL_GROUP).await;
    assert!(after.iter().all(|c| *c == Some(0)), "{after:?}");
    browser.close().await;
    service.stop().await;
}

#[tokio::test]
async fn a_replay_of_a_time_range_is_planned_started_and_watched_to_the_end() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let service = Service::start(&db, &smtp, &[]).await;
    let from = chrono::Utc::now() - chrono::Duration::minutes(5);
    for i in 0..4 {
        service.place_order(&format!("r{i}@example.com")).await;
    }
    wait_for_mails(&smtp, 4, Duration::from_secs(30)).await;

    let browser = Browser::start("replay").await;
    browser.goto(&format!("{}/replays", service.base)).await;
    // A time range that ends before it starts: a clear message.
    browser
        .fill("#replay input[name=from]", &from.to_rfc3339())
        .await;
    browser
        .fill(
            "#replay input[name=to]",
            &(from - chrono::Duration::hours(1)).to_rfc3339(),
        )
        .await;
    browser.click("#replay button[type=submit]").await;
    let message = browser
        .wait_text(".error", "the refusal of an empty range", |_| true)
        .await;
    assert!(message.contains("is not after --from"), "{message}");
    browser.screenshot("replay-bad-range").await;

    browser.goto(&format!("{}/replays", service.base)).await;
    browser
        .fill("#replay input[name=from]", &from.to_rfc3339())
        .await;
    browser.fill("#replay input[name=max_rate]", "50").await;
    browser.click("#replay button[type=submit]").await;
    let total = browser.wait_text("#plan-total", "the plan", |_| true).await;
    assert_eq!(total, "4");
    browser.screenshot("replay-plan").await;
    browser.click("#confirm button[type=submit]").await;
    browser
        .wait_text("#progress .state", "the run to finish, live", |t| {
            t == "done"
        })
        .await;
    assert!(browser.text("#done").await.starts_with("4 of 4"));
    browser.screenshot("replay-done").await;
    wait_for_mails(&smtp, 8, Duration::from_secs(30)).await;
    // The same preview confirmed again (the back button, a double click)
    // starts nothing: it shows the run it started.
    let first_run = browser.client.current_url().await.unwrap().to_string();
    browser.client.back().await.unwrap();
    browser.click("#confirm button[type=submit]").await;
    browser
        .wait_text("#progress .state", "the first run again", |t| t == "done")
        .await;
    assert_eq!(
        browser.client.current_url().await.unwrap().to_string(),
        first_run
    );
    assert_eq!(
        count(&db.client().await, "SELECT count(*) FROM replay_runs").await,
        1
    );

    // Another, slowed to a mail every two seconds: stopped from its page, then
    // resumed there to the end; every event is mailed once by the run.
    browser.goto(&format!("{}/replays", service.base)).await;
    browser
        .fill("#replay input[name=from]", &from.to_rfc3339())
        .await;
    browser.fill("#replay input[name=max_rate]", "0.5").await;
    browser.click("#replay button[type=submit]").await;
    browser
        .wait_text("#plan-total", "the second plan", |t| t == "4")
        .await;
    browser.click("#confirm button[type=submit]").await;
    browser
        .wait_text("#done", "a first mail of the slow run", |t| {
            !t.starts_with("0 of")
        })
        .await;
    browser.click("button.danger").await; // Stop (resume later)
    let run_page = browser.client.current_url().await.unwrap().to_string();
    eventually(
        "the slow run to be interrupted",
        Duration::from_secs(30),
        || async {
            browser.goto(&run_page).await;
            let state = browser.text("#progress .state").await;
            let resumable = browser.count("#resume").await == 1;
            (state == "interrupted" && resumable).then_some(())
        },
    )
    .await;
    let done_before = browser.text("#done").await;
    assert!(
        !done_before.starts_with("4 of 4"),
        "stopped before its end: {done_before}"
    );
    browser.screenshot("replay-interrupted").await;
    browser.click("#resume button[type=submit]").await;
    browser
        .wait_text("#progress .state", "the resumed run to finish", |t| {
            t == "done"
        })
        .await;
    // Done means every event settled: what the server accepted is all there is.
    wait_for_mails(&smtp, 12, Duration::from_secs(30)).await;
    assert_eq!(
        smtp.messages().len(),
        12,
        "the resumed run mailed an event twice"
    );
    browser.close().await;
    service.stop().await;
}

#[tokio::test]
async fn read_only_shows_no_write_control_and_refuses_every_write_route() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let token = "console-token-for-the-test";
    let service = Service::start(
        &db,
        &smtp,
        &["--console-read-only", "--console-token", token],
    )
    .await;
    let order = service
        .place_mailed_order(&db, &smtp, "ro@example.com")
        .await;

    // Without the token: 401 (a script) or the login page (a browser).
    let http = no_redirects();
    let (status, code) =
        error_code(http.get(format!("{}/", service.base)).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let (status, _) = error_code(
        http.post(format!("{}/dead-letters/act", service.base))
            .form(&[("action", "retry")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);

    let browser = Browser::start("read-only").await;
    browser.goto(&format!("{}/", service.base)).await;
    browser
        .fill("input[name=password]", "wrong-token-000000")
        .await;
    browser.click("form button[type=submit]").await;
    browser
        .wait_text(".error", "a wrong token refused", |t| t.contains("wrong"))
        .await;
    browser.fill("input[name=password]", token).await;
    browser.click("form button[type=submit]").await;
    browser
        .wait_text("[data-test=read-only]", "the read-only badge", |_| true)
        .await;
    let pages = [
        "/".to_string(),
        format!("/orders?q={order}"),
        "/topics".into(),
        "/topics/order-created".into(),
        "/topics/order-created/0?newest=1".into(),
        "/groups".into(),
        format!("/groups/{MAIL_GROUP}"),
        "/dead-letters".into(),
        "/parked".into(),
        "/replays".into(),
        "/audit".into(),
    ];
    for (i, page) in pages.iter().enumerate() {
        browser.goto(&format!("{}{page}", service.base)).await;
        browser.wait_text("h1", "the page", |_| true).await;
        // The only POST form is the logout.
        let posts = browser
            .client
            .find_all(fantoccini::Locator::Css("form[method=post]"))
            .await
            .unwrap();
        let mut actions = Vec::new();
        for form in posts {
            actions.push(form.attr("action").await.unwrap().unwrap_or_default());
        }
        assert!(
            actions.iter().all(|a| a.ends_with("/logout")),
            "{page} renders write controls: {actions:?}"
        );
        browser.screenshot(&format!("{i:02}")).await;
    }
    browser.close().await;

    // Each write route answers 403, with the token and a session alike.
    let session = Session::open(&service.base, Some(token)).await;
    let before = committed_sum(&db, MAIL_GROUP).await;
    for route in [
        format!("/groups/{MAIL_GROUP}/reset"),
        "/dead-letters/act".into(),
        "/parked/redrive".into(),
        "/replays/start".into(),
        "/replays/1/resume".into(),
    ] {
        let response = http
            .post(format!("{}{route}", service.base))
            .bearer_auth(token)
            .form(&[
                ("step", "confirm"),
                ("to", "earliest"),
                ("action", "retry"),
                ("scope", "filter"),
                ("csrf", &session.csrf),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (403, "read_only".to_string()),
            "{route}"
        );
    }
    assert_eq!(committed_sum(&db, MAIL_GROUP).await, before);
    assert_eq!(audit_entries(&db).await, 0);
    service.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_message_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let service = Service::start(&db, &smtp, &[]).await;
    service
        .place_mailed_order(&db, &smtp, "x@example.com")
        .await;
    let session = Session::open(&service.base, None).await;
    assert!(!session.cookie.is_empty() && !session.csrf.is_empty());
    let base = &service.base;
    let before = committed_sum(&db, MAIL_GROUP).await;
    assert_eq!(before, 1);

    // A forged CSRF token.
    let forged = session
        .post(
            &format!("{base}/dead-letters/act"),
            &[
                ("csrf", "0123456789abcdef0123456789abcdef"),
                ("step", "confirm"),
                ("action", "discard"),
                ("scope", "filter"),
            ],
        )
        .await;
    assert_eq!(
        error_code(forged).await,
        (403, "bad_csrf_token".to_string())
    );
    // No session cookie at all (a cross-site form would have none: SameSite=Strict).
    let bare = session
        .http
        .post(format!("{base}/groups/{MAIL_GROUP}/reset"))
        .form(&[("step", "preview")])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(bare).await.0, 403);
    // Another site's form, even with the cookie.
    let cross = session
        .http
        .post(format!("{base}/groups/{MAIL_GROUP}/reset"))
        .header("cookie", &session.cookie)
        .header("origin", "http://evil.example")
        .form(&[
            ("csrf", session.csrf.as_str()),
            ("step", "preview"),
            ("to", "earliest"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(cross).await, (403, "cross_origin".to_string()));
    // Without a token, only local requests: not one a proxy forwarded, nor
    // one for another host name (DNS rebinding).
    for (header, value) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("host", "evil.example"),
    ] {
        let response = session
            .http
            .get(format!("{base}/topics"))
            .header("cookie", &session.cookie)
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (401, "unauthenticated".to_string()),
            "{header}"
        );
    }

    let get = |path: String| {
        let http = session.http.clone();
        let cookie = session.cookie.clone();
        async move {
            error_code(
                http.get(format!("{base}{path}"))
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    // Over-long filters; non-numeric offsets and partitions; unknown things.
    let long = "k".repeat(5000);
    for (path, status, code) in [
        (format!("/dead-letters?key={long}"), 400, "filter_too_long"),
        (
            format!("/topics/order-created?key={long}"),
            400,
            "key_too_long",
        ),
        (format!("/orders?q={long}"), 400, "query_too_long"),
        (
            "/topics/order-created/0?from=abc".into(),
            400,
            "invalid_offset",
        ),
        (
            "/topics/order-created?key=1&before=abc".into(),
            400,
            "invalid_offset",
        ),
        ("/topics/order-created/x".into(), 400, "invalid_partition"),
        ("/topics/order-created/99".into(), 404, "unknown_partition"),
        ("/topics/nope".into(), 404, "unknown_topic"),
        ("/groups/nope".into(), 404, "unknown_group"),
        ("/replays/123456".into(), 404, "unknown_run"),
        ("/orders?q=hello".into(), 400, "invalid_lookup"),
    ] {
        assert_eq!(
            get(path.clone()).await,
            (status, code.to_string()),
            "{path:.60}"
        );
    }
    // Writes with bad input.
    let reset = format!("/groups/{MAIL_GROUP}/reset");
    let writes: [BadWrite; 9] = [
        (
            "/groups/nope/reset",
            &[("step", "preview"), ("to", "earliest")],
            404,
            "unknown_group",
        ),
        (
            &reset,
            &[("step", "preview"), ("to", "offset"), ("value", "-5")],
            400,
            "invalid_reset",
        ),
        (
            &reset,
            &[("step", "preview"), ("to", "sideways")],
            400,
            "invalid_reset",
        ),
        (
            &reset,
            &[("step", "confirm"), ("plan", "order-created x 1 0")],
            400,
            "invalid_plan",
        ),
        (
            "/replays/start",
            &[
                ("step", "preview"),
                ("from", "2026-12-02T00:00:00Z"),
                ("to", "2026-12-01T00:00:00Z"),
            ],
            400,
            "invalid_replay",
        ),
        (
            "/replays/start",
            &[
                ("step", "preview"),
                ("by", "offset"),
                ("from_offset", "abc"),
            ],
            400,
            "invalid_replay",
        ),
        (
            "/replays/start",
            &[("step", "confirm"), ("from", "2026-12-01T00:00:00Z")],
            400,
            "invalid_replay",
        ),
        (
            "/dead-letters/act",
            &[("step", "confirm"), ("action", "explode")],
            400,
            "invalid_action",
        ),
        (
            "/dead-letters/act",
            &[("step", "confirm"), ("action", "retry")],
            400,
            "empty_selection",
        ),
    ];
    for (path, form, status, code) in writes {
        let mut fields = vec![("csrf", session.csrf.as_str())];
        fields.extend_from_slice(form);
        let answer = error_code(session.post(&format!("{base}{path}"), &fields).await).await;
        assert_eq!(answer, (status, code.to_string()), "{path} {form:?}");
    }

    assert_eq!(committed_sum(&db, MAIL_GROUP).await, before);
    assert_eq!(audit_entries(&db).await, 0);
    assert_eq!(
        count(&db.client().await, "SELECT count(*) FROM replay_runs").await,
        0
    );
    service.stop().await;
}

#[tokio::test]
async fn off_loopback_the_console_needs_a_token_and_refuses_to_start_without() {
    let db = TestDb::migrated().await;
    let port = free_port();
    let output = binary(&db)
        .args([
            "serve",
            "--roles",
            "api,console",
            "--http-addr",
            &format!("0.0.0.0:{port}"),
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("would be open off loopback: set CONSOLE_TOKEN"),
        "{stderr}"
    );

    // With a token, off loopback: every request needs it.
    let token = "an-off-loopback-console-token";
    let mut child = binary(&db)
        .args([
            "serve",
            "--roles",
            "api,console",
            "--http-addr",
            &format!("0.0.0.0:{port}"),
            "--console-token",
            token,
        ])
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/console");
    let status = eventually("the console to answer", Duration::from_secs(30), || async {
        http.get(format!("{base}/topics"))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    })
    .await;
    assert_eq!(status, 401);
    let ok = http
        .get(format!("{base}/topics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let wrong = http
        .get(format!("{base}/topics"))
        .bearer_auth("not-the-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_user_sees_payloads_and_acts_only_as_permitted() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let hash =
        outbox_relay::kafka_api::security::PasswordHash::new("pw-of-the-test", 1000).to_string();
    let users = format!("viewer:{hash}:read ops:{hash}:read,write,payloads");
    let service = Service::start(&db, &smtp, &["--console-users", &users]).await;
    let order = service
        .place_mailed_order(&db, &smtp, "ada@example.com")
        .await;
    let http = no_redirects();
    let log_in = |user: &'static str, password: &'static str| {
        let http = http.clone();
        let base = service.base.clone();
        async move {
            let response = http
                .post(format!("{base}/login"))
                .form(&[("user", user), ("password", password)])
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let cookie = response
                .headers()
                .get("set-cookie")
                .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string());
            (status, cookie)
        }
    };
    assert_eq!(log_in("viewer", "wrong").await, (401, None));
    assert_eq!(log_in("nobody", "pw-of-the-test").await, (401, None));
    let (_, viewer) = log_in("viewer", "pw-of-the-test").await;
    let (_, ops) = log_in("ops", "pw-of-the-test").await;
    let page = |cookie: String, path: String| {
        let http = http.clone();
        let base = service.base.clone();
        async move {
            http.get(format!("{base}{path}"))
                .header("cookie", cookie)
                .header("accept", "text/html")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let partition: i32 = db
        .client()
        .await
        .query_one(
            "SELECT partition FROM event_log WHERE key = $1",
            &[&order.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    for path in [
        format!("/orders?q={order}"),
        format!("/topics/order-created/{partition}?from=0"),
    ] {
        let masked = page(viewer.clone().unwrap(), path.clone()).await;
        assert!(
            !masked.contains("ada@example.com") && masked.contains("a•••@example.com"),
            "{path} shows the address to viewer"
        );
        let shown = page(ops.clone().unwrap(), path.clone()).await;
        assert!(
            shown.contains("ada@example.com"),
            "{path} hides the address from ops"
        );
    }
    // A key's records, found in its partition (Kafka's partitioner).
    let found = page(
        ops.clone().unwrap(),
        format!("/topics/order-created?key={order}"),
    )
    .await;
    assert!(
        found.contains(&format!("Partition {partition} (the key's"))
            && found.contains(": 1 records"),
        "the key search did not find the order's record"
    );
    assert!(found.contains("ada@example.com"));
    // viewer may not act: 403, whatever the form.
    let viewer_page = page(viewer.clone().unwrap(), "/dead-letters".into()).await;
    assert!(
        !viewer_page.contains("/dead-letters/act"),
        "a write form rendered for viewer"
    );
    let response = http
        .post(format!("{}/dead-letters/act", service.base))
        .header("cookie", viewer.unwrap())
        .form(&[
            ("step", "confirm"),
            ("action", "discard"),
            ("scope", "filter"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (403, "forbidden".to_string()));
    service.stop().await;
}

/// A reset's preview (to the earliest) as a script: the plan's fields and
/// its signature, from the confirm form.
async fn reset_preview(session: &Session, url: &str) -> (Vec<String>, String) {
    let page = session
        .post(
            url,
            &[
                ("csrf", &session.csrf),
                ("step", "preview"),
                ("to", "earliest"),
            ],
        )
        .await
        .text()
        .await
        .unwrap();
    let values = |name: &str| -> Vec<String> {
        page.split(&format!("name=\"{name}\" value=\""))
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().to_string())
            .collect()
    };
    (
        values("plan"),
        values("plan_mac").pop().expect("a confirm form"),
    )
}

/// Confirms `plan` with `mac`: the status and error code.
async fn reset_confirm(
    session: &Session,
    url: &str,
    plan: Vec<String>,
    mac: String,
) -> (u16, String) {
    let mut form = vec![
        ("csrf", session.csrf.clone()),
        ("step", "confirm".to_string()),
        ("plan_mac", mac),
    ];
    form.extend(plan.into_iter().map(|p| ("plan", p)));
    let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    error_code(session.post(url, &refs).await).await
}

#[tokio::test]
async fn a_reset_applies_exactly_the_previewed_plan_or_nothing() {
    let db = TestDb::migrated().await;
    // No mail worker: the group below is stopped.
    let service = Service::start_roles(&db, None, "api,relay,console", &[]).await;
    for i in 0..16 {
        service.place_order(&format!("p{i}@example.com")).await;
    }
    let client = db.client().await;
    eventually("the orders in the log", Duration::from_secs(30), || async {
        (count(&client, "SELECT count(*) FROM event_log").await == 16).then_some(())
    })
    .await;
    client
        .execute(
            "INSERT INTO group_partitions (group_id, topic, partition, committed_offset)
             SELECT 'billing', topic, partition, log_end_offset FROM partition_heads WHERE topic = 'order-created'",
            &[],
        )
        .await
        .unwrap();
    let session = Session::open(&service.base, None).await;
    let url = format!("{}/groups/billing/reset", service.base);
    let before = committed(&db, "billing").await;
    let (plan, mac) = reset_preview(&session, &url).await;
    assert_eq!(plan.len(), 8);
    // A plan changed in the browser (a new offset past the log end) is refused.
    let mut tampered = plan.clone();
    tampered[0] = tampered[0]
        .rsplit_once(' ')
        .map(|(head, _)| format!("{head} 999999"))
        .unwrap();
    assert_eq!(
        reset_confirm(&session, &url, tampered, mac.clone()).await,
        (400, "invalid_plan".to_string())
    );
    assert_eq!(committed(&db, "billing").await, before);
    // A commit after the preview: the confirm is refused, nothing moves.
    let moved = client
        .execute(
            "UPDATE group_partitions SET committed_offset = committed_offset - 1
              WHERE group_id = 'billing' AND partition = (
                    SELECT min(partition) FROM group_partitions WHERE group_id = 'billing' AND committed_offset > 0)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let after_commit = committed(&db, "billing").await;
    assert_eq!(
        reset_confirm(&session, &url, plan, mac).await,
        (409, "changed_since_preview".to_string())
    );
    assert_eq!(committed(&db, "billing").await, after_commit);
    // Previewed again, it applies.
    let (plan, mac) = reset_preview(&session, &url).await;
    let (status, _) = reset_confirm(&session, &url, plan, mac).await;
    assert_eq!(status, 200);
    let reset = committed(&db, "billing").await;
    assert!(reset.iter().all(|c| *c == Some(0)), "{reset:?}");
    // The refused confirm and the applied one, each with how it ended.
    let outcomes: Vec<String> = client
        .query("SELECT outcome FROM console_audit ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes, ["changed_since_preview", "done"]);
    service.stop().await;
}

/// The README's first command: `demo` prints the console's address, and
/// the order it names is there, its mail sent.
#[tokio::test]
async fn demo_prints_the_console_address_and_the_order_it_names_is_there() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::migrated().await;
    let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("console-demo-{:x}", rand::random::<u32>()));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut demo = binary(&db)
        .args([
            "--data-dir",
            &data_dir.to_string_lossy(),
            "demo",
            "--orders",
            "2",
        ])
        .args(["--http-addr", &addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("the console: ") {
                return line;
            }
        }
        panic!("demo ended without naming the console");
    })
    .await
    .expect("the console's address within 60 s");
    let url = line["the console: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(url, format!("http://{addr}/console/"));
    let order: i64 = line
        .split("did order ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .and_then(|id| id.parse().ok())
        .expect("the order it names");
    let http = reqwest::Client::new();
    let overview = http
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status().as_u16(), 200);
    assert!(overview
        .text()
        .await
        .unwrap()
        .contains("Find an order by id or email"));
    let page = http
        .get(format!("{url}orders?q={order}"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("data-state=\"sent\""),
        "the demo's order is not shown sent"
    );
    demo.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `CONSOLE_DATABASE_URL`: the browsing pages read the replica it names,
/// while the pipeline writes the primary. (A second database stands in
/// for a replica that has not caught up: the order is not there yet.)
#[tokio::test]
async fn the_console_browses_the_replica_it_is_given() {
    let db = TestDb::migrated().await;
    let replica = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let service = Service::start(&db, &smtp, &["--console-database-url", &replica.url]).await;
    let order = service.place_order("replica@example.com").await;
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let on_primary = http
        .get(format!("http://{}/orders/{order}", service.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(on_primary.status().as_u16(), 200);
    let in_console = http
        .get(format!("{}/orders?q={order}", service.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(in_console).await,
        (404, "order_not_found".to_string())
    );
    service.stop().await;
}

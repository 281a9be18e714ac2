//! The login page, logging in (a token, or a user's password) and out:
//! a session cookie signed by [`super::auth::Auth`].

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::html;

use super::auth::{set_cookie, SESSION_TTL};
use super::page;
use super::Console;

#[derive(serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    user: String,
    password: String,
}

pub async fn login_page(State(console): State<Console>, headers: HeaderMap) -> Response {
    let base = page::base(&headers);
    login_form(&console, &base, None, StatusCode::OK)
}

fn login_form(console: &Console, base: &str, error: Option<&str>, status: StatusCode) -> Response {
    let users = console.auth.has_users();
    let body = html! {
        h1 { "Log in" }
        @if let Some(error) = error { p.error data-code="unauthenticated" { (error) } }
        form method="post" action={(base) "/login"} {
            @if users { label { "User " input name="user" autocomplete="username"; } " " }
            label { (if users { "Password or token " } else { "Token " })
                input type="password" name="password" autocomplete="current-password"; }
            " " button type="submit" { "Log in" }
        }
        @if !users { p.hint { "The token is the server's CONSOLE_TOKEN." } }
    };
    (status, page::bare(base, "Log in", body)).into_response()
}

pub async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let base = page::base(&headers);
    match console.auth.log_in(&form.user, &form.password).await {
        Some((user, permissions)) => {
            let value = console.auth.issue(&user, permissions);
            let mut response = Redirect::to(&format!("{base}/")).into_response();
            response.headers_mut().append(
                header::SET_COOKIE,
                set_cookie(&base, &value, SESSION_TTL.as_secs()),
            );
            response
        }
        None => {
            // As slow for a wrong token as for a wrong user's password.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            login_form(
                &console,
                &base,
                Some("wrong user, password or token"),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
}

pub async fn logout(headers: HeaderMap) -> Response {
    let base = page::base(&headers);
    let mut response = Redirect::to(&format!("{base}/login")).into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, set_cookie(&base, "", 0));
    response
}

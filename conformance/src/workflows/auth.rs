//! The Docker token flow, when credentials are given: the challenge names the scope the request
//! needs, a token for that scope is issued, and the retried request succeeds.

use reqwest::Method;

use crate::Runner;
use crate::client::parse_challenge;

const W: &str = "auth";

impl Runner {
    pub(crate) async fn auth(&mut self) {
        let ns = self.cfg.namespace.clone();
        let r = async {
            let r = self
                .client
                .req(Method::GET, "/v2/")
                .anonymous()
                .send()
                .await?;
            r.expect(&[401])?;
            let h = r
                .header("www-authenticate")
                .ok_or("401 without WWW-Authenticate")?;
            let c = parse_challenge(h).ok_or_else(|| format!("unparsable challenge {h:?}"))?;
            if c.scheme == "bearer" && !c.params.contains_key("realm") {
                return Err(format!("Bearer challenge without realm: {h}"));
            }
            Ok(())
        }
        .await;
        self.check(W, "anonymous GET /v2/ is 401 with a challenge", r);
        let r = async {
            let path = format!("/v2/{ns}/tags/list");
            let r = self
                .client
                .req(Method::GET, &path)
                .anonymous()
                .send()
                .await?;
            r.expect(&[401])?;
            let h = r
                .header("www-authenticate")
                .ok_or("401 without WWW-Authenticate")?
                .to_owned();
            let c = parse_challenge(&h).ok_or_else(|| format!("unparsable challenge {h:?}"))?;
            if c.scheme != "bearer" {
                return Ok(()); // Basic auth: no scopes to check
            }
            let want = format!("repository:{ns}:pull");
            let scope = c.params.get("scope").cloned().unwrap_or_default();
            if !scope.split(' ').any(|s| {
                s == want || (s.starts_with(&format!("repository:{ns}:")) && s.contains("pull"))
            }) {
                return Err(format!("challenge scope {scope:?} does not name {want}"));
            }
            let token = self.client.token(&c).await?;
            let r = self
                .client
                .req(Method::GET, &path)
                .anonymous()
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await?;
            r.expect(&[200, 404]).map(|_| ())
        }
        .await;
        self.check(
            W,
            "challenge names the pull scope; its token is accepted",
            r,
        );
    }
}

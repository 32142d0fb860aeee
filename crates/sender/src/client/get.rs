//! GETs below the receiver's base URL: plain (`/health`) and signed (`/deployments`), as the
//! doctor uses them.

use std::time::Duration;

use reqwest::Method;

use super::ReceiverClient;

impl ReceiverClient {
    /// `GET path_and_query` (e.g. `/health`) below the base URL, unsigned, within `timeout`.
    pub async fn get(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .get(self.target.url(path_and_query))
            .timeout(timeout)
            .send()
            .await
    }

    /// A signed `GET path_and_query` (e.g. `/deployments?limit=1`) below the base URL, within
    /// `timeout`.
    pub async fn signed_get(
        &self,
        path_and_query: &str,
        correlation_id: Option<&str>,
        timeout: Duration,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let url = self.target.url(path_and_query);
        self.signed(Method::GET, url, b"", correlation_id)
            .timeout(timeout)
            .send()
            .await
    }
}

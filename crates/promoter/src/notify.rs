//! Where run summaries go: the console (a log line) and, when the plan names one, a webhook
//! that receives the summary as JSON. A notification failure is logged, never fatal.

use async_trait::async_trait;
use tracing::{info, warn};

use crate::RunSummary;

#[async_trait]
pub trait Notifier: Send + Sync {
    async fn notify(&self, summary: &RunSummary, webhook: Option<&str>);
}

/// Logs the summary and posts it to the webhook when one is configured.
#[derive(Debug, Default, Clone, Copy)]
pub struct StandardNotifier;

#[async_trait]
impl Notifier for StandardNotifier {
    async fn notify(&self, summary: &RunSummary, webhook: Option<&str>) {
        info!(
            plan_id = %summary.plan_id,
            run_id = %summary.run_id,
            environment = %summary.environment,
            outcome = %summary.outcome,
            tasks = summary.tasks,
            intervals = summary.intervals,
            retries = summary.retries,
            seconds = summary.finished_at - summary.started_at,
            "run finished"
        );
        let Some(url) = webhook else { return };
        let body = match serde_json::to_string(summary) {
            Ok(body) => body,
            Err(error) => {
                warn!(error = %error, "could not encode the run summary");
                return;
            }
        };
        let url = url.to_string();
        let posted = tokio::task::spawn_blocking(move || {
            ureq::post(&url).header("content-type", "application/json").send(body.as_bytes()).map(|_| ())
        })
        .await;
        match posted {
            Ok(Ok(())) => info!("run summary posted to the webhook"),
            // The URL may carry a token: the error's text is logged without it.
            Ok(Err(error)) => {
                warn!(error = %redact(&error.to_string()), "posting the run summary to the webhook failed")
            }
            Err(error) => warn!(error = %error, "posting the run summary to the webhook failed"),
        }
    }
}

/// Drops anything that looks like a URL from an error text.
fn redact(text: &str) -> String {
    text.split_whitespace()
        .map(|word| if word.contains("://") { "<webhook url>" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

//! The BigQuery calls the warehouse makes, over REST v2 and the media upload
//! of load jobs. gcp-bigquery-client provides the credentials (its
//! `Authenticator` over yup-oauth2) and the typed API models; the requests
//! go through its HTTP stack (reqwest) here, because its own calls parse
//! every error body as JSON and so lose the HTTP status of a plain-text 502,
//! 503 or 429 from a front end, which must be retried.
//!
//! Every answer is checked for errors, including a failed job or query
//! answered with HTTP 200, and a call answered 5xx, 429 or a rate-limit
//! reason is retried with backoff before its error is returned.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::dataset_reference::DatasetReference;
use gcp_bigquery_client::model::error_proto::ErrorProto;
use gcp_bigquery_client::model::get_query_results_response::GetQueryResultsResponse;
use gcp_bigquery_client::model::job::Job;
use gcp_bigquery_client::model::job_configuration::JobConfiguration;
use gcp_bigquery_client::model::job_configuration_load::JobConfigurationLoad;
use gcp_bigquery_client::model::job_configuration_query::JobConfigurationQuery;
use gcp_bigquery_client::model::job_reference::JobReference;
use gcp_bigquery_client::model::query_parameter::QueryParameter;
use gcp_bigquery_client::model::query_parameter_type::QueryParameterType;
use gcp_bigquery_client::model::query_parameter_value::QueryParameterValue;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_reference::TableReference;
use gcp_bigquery_client::model::table_row::TableRow;
use gcp_bigquery_client::model::table_schema::TableSchema;
use gcp_bigquery_client::yup_oauth2;

use crate::config::BigQueryConfig;
use crate::error::{Error, Result, RetryPolicy};

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
const GOOGLE_API: &str = "https://bigquery.googleapis.com";
/// Tries of one call before its error is returned.
const TRIES: u32 = 5;

/// Where access tokens come from.
#[derive(Clone)]
enum Tokens {
    /// An emulator: no credentials.
    None,
    /// A service-account key, application default credentials or the metadata server.
    Google(yup_oauth2::authenticator::DefaultAuthenticator),
}

#[async_trait::async_trait]
impl Authenticator for Tokens {
    async fn access_token(&self) -> std::result::Result<String, BQError> {
        match self {
            Tokens::None => Ok("emulator".into()),
            Tokens::Google(auth) => Ok(auth
                .token(&[SCOPE])
                .await?
                .token()
                .ok_or(BQError::NoToken)?
                .to_string()),
        }
    }
}

impl Tokens {
    /// The configured credentials: the `credentials` file; else application
    /// default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's
    /// file, then the metadata server). With an `endpoint` and no
    /// `credentials` (an emulator), none.
    async fn from_config(config: &BigQueryConfig) -> Result<Tokens> {
        let file = match &config.credentials {
            Some(path) => Some(path.clone()),
            None if config.endpoint.is_some() => return Ok(Tokens::None),
            None => default_credentials_file(),
        };
        let auth = match file {
            Some(path) => authenticator_from_file(&path).await?,
            None => {
                use yup_oauth2::authenticator::ApplicationDefaultCredentialsTypes as Adc;
                let opts = yup_oauth2::ApplicationDefaultCredentialsFlowOpts::default();
                match yup_oauth2::ApplicationDefaultCredentialsAuthenticator::builder(opts).await {
                    Adc::InstanceMetadata(b) => b.build().await,
                    Adc::ServiceAccount(b) => b.build().await,
                }
                .map_err(|e| auth_error("finding application default credentials", e))?
            }
        };
        Ok(Tokens::Google(auth))
    }
}

/// The error of credentials that could not be used.
fn auth_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::BigQuery {
        context: what.to_string(),
        status: None,
        reason: Some("authError".into()),
        message: e.to_string(),
    }
}

/// The application default credentials file: `GOOGLE_APPLICATION_CREDENTIALS`,
/// else gcloud's (`gcloud auth application-default login`) when it exists.
fn default_credentials_file() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
        return Some(path.into());
    }
    let gcloud = Path::new(&std::env::var_os("HOME")?)
        .join(".config/gcloud/application_default_credentials.json");
    gcloud.is_file().then_some(gcloud)
}

/// An authenticator for the credentials file at `path`, by its `type`:
/// a service-account key, a gcloud user login, workload identity federation
/// (`external_account`: a token from a file or URL, e.g. a Kubernetes
/// service-account token on EKS or AKS, exchanged at Google's STS, then
/// optionally for a service account's), or a user impersonating a service
/// account (`impersonated_service_account`, as `gcloud auth
/// application-default login --impersonate-service-account` writes it).
async fn authenticator_from_file(
    path: &Path,
) -> Result<yup_oauth2::authenticator::DefaultAuthenticator> {
    let context = format!("the credentials file {}", path.display());
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| auth_error(&format!("reading {context}"), e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| auth_error(&format!("reading {context} (not JSON)"), e))?;
    let bad = |e: serde_json::Error| auth_error(&format!("reading {context}"), e);
    let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let built = match kind {
        "service_account" => {
            let key = yup_oauth2::parse_service_account_key(&text)
                .map_err(|e| auth_error(&format!("reading {context}"), e))?;
            yup_oauth2::ServiceAccountAuthenticator::builder(key)
                .build()
                .await
        }
        "authorized_user" => {
            yup_oauth2::AuthorizedUserAuthenticator::builder(
                serde_json::from_value(value).map_err(bad)?,
            )
            .build()
            .await
        }
        "external_account" => {
            yup_oauth2::ExternalAccountAuthenticator::builder(
                serde_json::from_value(value).map_err(bad)?,
            )
            .build()
            .await
        }
        "impersonated_service_account" => {
            let source = &value["source_credentials"];
            if source.get("type").and_then(|t| t.as_str()) != Some("authorized_user") {
                return Err(auth_error(
                    &context,
                    "impersonation is supported from gcloud user credentials (source_credentials \
                     of type authorized_user); for a service account, give its own key or use \
                     workload identity",
                ));
            }
            let email = value["service_account_impersonation_url"]
                .as_str()
                .and_then(|u| u.split("serviceAccounts/").nth(1))
                .and_then(|rest| rest.split(':').next())
                .filter(|email| !email.is_empty())
                .ok_or_else(|| {
                    auth_error(
                        &context,
                        "service_account_impersonation_url does not name a service account",
                    )
                })?;
            yup_oauth2::ServiceAccountImpersonationAuthenticator::builder(
                serde_json::from_value(source.clone()).map_err(bad)?,
                email,
            )
            .build()
            .await
        }
        other => {
            return Err(auth_error(
                &context,
                format!(
                    "its type is {other:?}; cdcflow reads service_account, authorized_user, \
                     external_account and impersonated_service_account credentials"
                ),
            ));
        }
    };
    built.map_err(|e| auth_error(&format!("using {context}"), e))
}

/// One dataset's BigQuery API.
pub(super) struct Api {
    http: reqwest::Client,
    tokens: Arc<Tokens>,
    upload_url: String,
    v2_url: String,
    /// Project running the jobs.
    pub(super) project: String,
    /// Dataset of the tables.
    pub(super) dataset: String,
    location: String,
    /// Bytes per request of a resumable upload.
    chunk: u64,
    /// Bytes a query job may bill at most.
    maximum_bytes_billed: Option<u64>,
    /// Labels of every job: the pipeline and the dataset.
    labels: HashMap<String, String>,
}

/// The error of a failed call.
fn call_error(context: &str, err: BQError) -> Error {
    // The token server could not be reached (yup-oauth2's connection
    // errors): a later try may, as with any call. Refusals stay permanent.
    if let BQError::YupAuthError(
        yup_oauth2::Error::HttpError(_)
        | yup_oauth2::Error::HttpClientError(_)
        | yup_oauth2::Error::LowLevelError(_),
    ) = &err
    {
        return Error::BigQuery {
            context: format!("{context}: fetching an access token"),
            status: None,
            reason: None,
            message: crate::error::chain(&err),
        };
    }
    match err {
        BQError::ResponseError { error } => Error::BigQuery {
            context: context.to_string(),
            status: u16::try_from(error.error.code).ok(),
            reason: error
                .error
                .errors
                .first()
                .and_then(|e| e.get("reason").cloned()),
            message: error.error.message,
        },
        BQError::RequestError(e) => Error::BigQuery {
            context: context.to_string(),
            status: e.status().map(|s| s.as_u16()),
            // A request that could not be built or an answer that could not be
            // read will not do better next time; a failed connection may.
            reason: (e.is_builder() || e.is_decode()).then(|| "invalid".to_string()),
            message: crate::error::chain(&e),
        },
        other => Error::BigQuery {
            context: context.to_string(),
            status: None,
            reason: Some("authError".into()),
            message: crate::error::chain(&other),
        },
    }
}

/// Reads the JSON answer of a call (an error answer becomes [`Error::BigQuery`]).
async fn read_answer<T: serde::de::DeserializeOwned>(
    context: &str,
    response: reqwest::Response,
) -> Result<T> {
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| call_error(context, e.into()))?;
    if !status.is_success() {
        let parsed: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        return Err(Error::BigQuery {
            context: context.to_string(),
            status: Some(status.as_u16()),
            reason: error
                .and_then(|e| e.pointer("/errors/0/reason"))
                .and_then(|r| r.as_str())
                .map(String::from),
            message: error
                .and_then(|e| e.get("message"))
                .and_then(|m| m.as_str())
                .map(String::from)
                .unwrap_or(text),
        });
    }
    // A DELETE answers 204 with no body.
    let text = if text.trim().is_empty() {
        "null"
    } else {
        &text
    };
    serde_json::from_str(text).map_err(|e| call_error(context, e.into()))
}

/// The error of a job or query that BigQuery answered as failed.
fn job_error(context: &str, errors: &[ErrorProto]) -> Error {
    let first = errors.first();
    let mut message = errors
        .iter()
        .filter_map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    if message.contains("wide_number_mode") {
        message.push_str(
            " (a JSON value holds a number BigQuery cannot store exactly: fix it at the source, or \
             set `json_wide_numbers = \"round\"` under [warehouse] to store it rounded to a FLOAT64)",
        );
    }
    Error::BigQuery {
        context: context.to_string(),
        status: None,
        reason: first.and_then(|e| e.reason.clone()),
        message,
    }
}

/// The id of the `attempt`th try of job `id`.
fn attempt_id(id: &str, attempt: u32) -> String {
    if attempt == 1 {
        id.to_string()
    } else {
        format!("{id}_{attempt}")
    }
}

fn not_found(err: &Error) -> bool {
    matches!(
        err,
        Error::BigQuery {
            status: Some(404),
            ..
        }
    )
}

impl Api {
    /// Connects with the configured credentials (none for an emulator).
    pub(super) async fn connect(config: &BigQueryConfig, pipeline: &str) -> Result<Api> {
        let tokens = Arc::new(Tokens::from_config(config).await?);
        let base = config
            .endpoint
            .clone()
            .unwrap_or_else(|| GOOGLE_API.to_string());
        let base = base.trim_end_matches('/');
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| call_error("building the HTTP client", e.into()))?;
        Ok(Api {
            http,
            tokens,
            upload_url: format!("{base}/upload/bigquery/v2/projects/{}/jobs", config.project),
            v2_url: format!("{base}/bigquery/v2"),
            project: config.project.clone(),
            dataset: config.dataset.clone(),
            // Until the dataset is read (see `check_dataset`).
            location: config.location.clone().unwrap_or_else(|| "US".into()),
            chunk: config.upload_chunk_kib * 1024,
            maximum_bytes_billed: config.maximum_bytes_billed,
            labels: labels([
                ("cdcflow_pipeline", pipeline),
                ("cdcflow_dataset", &config.dataset),
            ]),
        })
    }

    /// The labels of a job: every job's, and `extra`.
    fn job_labels(&self, extra: &HashMap<String, String>) -> Option<HashMap<String, String>> {
        let mut labels = self.labels.clone();
        labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(labels)
    }

    /// The REST URL of table `name` (of the table collection for "").
    fn table_url(&self, name: &str) -> String {
        format!(
            "{}/projects/{}/datasets/{}/tables/{name}",
            self.v2_url, self.project, self.dataset
        )
        .trim_end_matches('/')
        .to_string()
    }

    fn jobs_url(&self) -> String {
        format!("{}/projects/{}/jobs", self.v2_url, self.project)
    }

    /// `project.dataset.name`, quoted for GoogleSQL.
    pub(super) fn path(&self, name: &str) -> String {
        format!("`{}.{}.{}`", self.project, self.dataset, name)
    }

    fn reference(&self, name: &str) -> TableReference {
        TableReference::new(&self.project, &self.dataset, name)
    }

    /// Runs `call` until it succeeds, fails for good, or has been tried `TRIES` times.
    async fn retry<T, F, Fut>(&self, context: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(250);
        for attempt in 1.. {
            match call().await {
                Err(e) if e.retry_policy() == RetryPolicy::Retry && attempt < TRIES => {
                    tracing::warn!(call = context, attempt, error = %e, "BigQuery call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Sends a request made on this API's HTTP client with a token, and reads
    /// its JSON answer (an error answer becomes [`Error::BigQuery`]).
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        context: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T> {
        let response = self.send_raw(context, request).await?;
        read_answer(context, response).await
    }

    /// Sends a request made on this API's HTTP client with a token.
    async fn send_raw(
        &self,
        context: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let token = self
            .tokens
            .access_token()
            .await
            .map_err(|e| call_error(context, e))?;
        request
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| call_error(context, e.into()))
    }

    /// Reads the dataset (an error says how to create it) and takes its
    /// location for every job: BigQuery fails a job sent to another one. A
    /// `location` in the pipeline file must be the dataset's.
    pub(super) async fn check_dataset(&mut self, stated: Option<&str>) -> Result<()> {
        let context = format!("dataset {}.{}", self.project, self.dataset);
        let url = format!(
            "{}/projects/{}/datasets/{}",
            self.v2_url, self.project, self.dataset
        );
        let dataset: serde_json::Value = self
            .retry(&context, || self.send(&context, self.http.get(&url)))
            .await?;
        let Some(actual) = dataset["location"].as_str() else {
            return Ok(());
        };
        match stated {
            Some(stated) if !stated.eq_ignore_ascii_case(actual) => Err(Error::Usage(format!(
                "{context} is in location {actual}, but `warehouse.location` says {stated}: \
                 remove `location` from the pipeline file (the dataset's is used) or set it to {actual}"
            ))),
            _ => {
                self.location = actual.to_string();
                Ok(())
            }
        }
    }

    /// The table `name`, or `None` when it does not exist.
    pub(super) async fn table(&self, name: &str) -> Result<Option<Table>> {
        let context = format!("reading table {name}");
        let got = self
            .retry(&context, || {
                self.send(&context, self.http.get(self.table_url(name)))
            })
            .await;
        match got {
            Err(e) if not_found(&e) => Ok(None),
            other => other.map(Some),
        }
    }

    /// A new table `name` (nothing happens when it exists already).
    pub(super) async fn create_table(
        &self,
        name: &str,
        shape: impl Fn(Table) -> Table,
    ) -> Result<()> {
        let context = format!("creating table {name}");
        let table = shape(Table::new(
            &self.project,
            &self.dataset,
            name,
            TableSchema::new(Vec::new()),
        ));
        let created = self
            .retry(&context, || {
                self.send::<serde_json::Value>(
                    &context,
                    self.http.post(self.table_url("")).json(&table),
                )
            })
            .await;
        match created {
            Err(Error::BigQuery {
                status: Some(409), ..
            }) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Replaces the schema of table `name` (adding columns).
    pub(super) async fn set_schema(&self, name: &str, schema: TableSchema) -> Result<()> {
        let context = format!("adding columns to {name}");
        let mut table = Table::new(&self.project, &self.dataset, name, schema);
        table.table_reference = self.reference(name);
        self.retry(&context, || {
            self.send::<serde_json::Value>(
                &context,
                self.http.patch(self.table_url(name)).json(&table),
            )
        })
        .await
        .map(|_| ())
    }

    /// Drops table `name` if it exists.
    pub(super) async fn drop_table(&self, name: &str) -> Result<()> {
        let context = format!("dropping table {name}");
        let dropped = self
            .retry(&context, || {
                self.send::<serde_json::Value>(&context, self.http.delete(self.table_url(name)))
            })
            .await;
        match dropped {
            Err(e) if not_found(&e) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The job `id`, or `None` when there is none.
    pub(super) async fn job(&self, id: &str) -> Result<Option<Job>> {
        let context = format!("reading job {id}");
        let got = self
            .retry(&context, || {
                self.send(
                    &context,
                    self.http
                        .get(format!("{}/{id}", self.jobs_url()))
                        .query(&[("location", &self.location)]),
                )
            })
            .await;
        match got {
            Err(e) if not_found(&e) => Ok(None),
            other => other.map(Some),
        }
    }

    /// Waits until job `id` is done; its error if it failed.
    async fn wait(&self, id: &str, context: &str) -> Result<Job> {
        let mut delay = Duration::from_millis(100);
        loop {
            let job = self.job(id).await?.ok_or_else(|| Error::BigQuery {
                context: context.to_string(),
                status: Some(404),
                reason: None,
                message: format!("job {id} disappeared"),
            })?;
            let status = job.status.clone().unwrap_or_default();
            if status.state.as_deref() == Some("DONE") {
                if let Some(error) = status.error_result {
                    let errors = status.errors.unwrap_or_else(|| vec![error]);
                    return Err(job_error(context, &errors));
                }
                return Ok(job);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether job `id` (or a later attempt `id_2`, `id_3`… made after it
    /// failed, see [`Api::run_job`]) ran to success.
    pub(super) async fn job_succeeded(&self, id: &str) -> Result<bool> {
        for attempt in 1.. {
            let Some(job) = self.job(&attempt_id(id, attempt)).await? else {
                return Ok(false);
            };
            let status = job.status.unwrap_or_default();
            if status.state.as_deref() != Some("DONE") {
                return Ok(false);
            }
            if status.error_result.is_none() {
                return Ok(true);
            }
        }
        unreachable!("the loop returns")
    }

    /// Runs a job under the deterministic id `id` and waits for it. With
    /// `reuse`, a job already done under that id is not run again (BigQuery
    /// answers a second insert of an id "duplicate"); when the earlier job
    /// failed (or without `reuse`), the next free id `id_2`, `id_3`… is used.
    /// `submit` starts the job under the id it is given and returns
    /// BigQuery's answer.
    async fn run_once<F, Fut>(&self, id: &str, reuse: bool, submit: F) -> Result<Billed>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Job>>,
    {
        for attempt in 1.. {
            let job_id = attempt_id(id, attempt);
            let context = format!("job {job_id}");
            let Some(job) = self.job(&job_id).await? else {
                let named = match submit(job_id.clone()).await {
                    // An emulator may assign its own id: wait for the job it names.
                    Ok(started) => started.job_reference.and_then(|r| r.job_id),
                    // A retried insert whose first try reached BigQuery (its answer
                    // was lost) is answered "duplicate": the job is ours, running.
                    Err(Error::BigQuery {
                        status: Some(409), ..
                    }) => {
                        tracing::info!(job = %job_id, "job already inserted by an earlier try; waiting for it");
                        None
                    }
                    Err(e) => return Err(e),
                };
                let done = self
                    .wait(named.as_deref().unwrap_or(&job_id), &context)
                    .await?;
                return Ok(Billed::of(&done));
            };
            let status = job.status.clone().unwrap_or_default();
            if !reuse {
                continue;
            }
            if status.state.as_deref() != Some("DONE") {
                let done = self.wait(&job_id, &context).await?;
                return Ok(Billed::of(&done));
            }
            if status.error_result.is_none() {
                tracing::info!(job = %job_id, "job already done; not run again");
                return Ok(Billed::of(&job));
            }
        }
        unreachable!("the loop returns")
    }

    /// A reference to job `job_id` (`None`: BigQuery names it) in this API's project and location.
    fn reference_of(&self, job_id: Option<String>) -> Option<JobReference> {
        Some(JobReference {
            job_id,
            location: Some(self.location.clone()),
            project_id: Some(self.project.clone()),
        })
    }

    /// Runs DML/DDL `sql` with its named query `params` as the query job
    /// `id` (see [`Api::run_once`]). Values reach BigQuery as parameters,
    /// never spliced into the SQL: an object key may hold any character.
    pub(super) async fn run_job(
        &self,
        job: &JobName,
        sql: &str,
        params: &[QueryParameter],
    ) -> Result<Billed> {
        self.run_once(&job.id, true, |job_id| async move {
            let context = format!("job {job_id}");
            let job = Job {
                job_reference: self.reference_of(Some(job_id)),
                configuration: Some(JobConfiguration {
                    query: Some(JobConfigurationQuery {
                        query: sql.to_string(),
                        use_legacy_sql: Some(false),
                        parameter_mode: (!params.is_empty()).then(|| "NAMED".to_string()),
                        query_parameters: (!params.is_empty()).then(|| params.to_vec()),
                        maximum_bytes_billed: self.maximum_bytes_billed.map(|b| b.to_string()),
                        ..Default::default()
                    }),
                    labels: self.job_labels(&job.labels),
                    ..Default::default()
                }),
                ..Default::default()
            };
            self.retry(&context, || {
                self.send(&context, self.http.post(self.jobs_url()).json(&job))
            })
            .await
        })
        .await
    }

    /// Loads the Parquet file at `file` into table `name` (created with
    /// `schema`, truncated first) by a load job with a media upload, under
    /// the first free id of `id`'s attempts (see [`Api::run_once`]).
    pub(super) async fn load_parquet(
        &self,
        job: &JobName,
        name: &str,
        schema: TableSchema,
        file: &Path,
    ) -> Result<Billed> {
        // A load into staging is idempotent (it truncates), so it is simply run
        // again under a fresh id: the staging table may have been dropped since.
        self.run_once(&job.id, false, |job_id| {
            let schema = schema.clone();
            async move {
                let context = format!("loading {name} (job {job_id})");
                let config = Job {
                    job_reference: self.reference_of(Some(job_id)),
                    configuration: Some(JobConfiguration {
                        load: Some(JobConfigurationLoad {
                            destination_table: Some(self.reference(name)),
                            source_format: Some("PARQUET".into()),
                            schema: Some(schema),
                            create_disposition: Some("CREATE_IF_NEEDED".into()),
                            write_disposition: Some("WRITE_TRUNCATE".into()),
                            decimal_target_types: Some(vec!["NUMERIC".into(), "BIGNUMERIC".into()]),
                            ..Default::default()
                        }),
                        labels: self.job_labels(&job.labels),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                self.upload(&context, &config, file).await
            }
        })
        .await
    }

    /// Sends `file` as the data of load job `config` by a resumable upload:
    /// a session, then the file in chunks of [`Api::chunk`] bytes read one at
    /// a time, so memory stays bounded whatever the file's size. After a
    /// failed chunk (a dropped connection, 5xx, 429) the session is asked how
    /// much it holds and the upload goes on from there; a session that is
    /// gone (404, 410) is started again. Returns the job BigQuery made.
    async fn upload(&self, context: &str, config: &Job, file: &Path) -> Result<Job> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let io = |e| Error::io("reading the staged batch", file.display(), e);
        let total = tokio::fs::metadata(file).await.map_err(io)?.len();
        let mut data = tokio::fs::File::open(file).await.map_err(io)?;
        let mut sessions = 0;
        'session: loop {
            sessions += 1;
            let session = self
                .retry(context, || self.start_upload(context, config, total))
                .await?;
            // `None`: unknown, ask the session.
            let mut offset = Some(0u64);
            let mut failures = 0;
            let mut delay = Duration::from_millis(250);
            loop {
                let answer = match offset {
                    Some(at) => {
                        let len = self.chunk.min(total - at);
                        let mut chunk = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                        data.seek(std::io::SeekFrom::Start(at)).await.map_err(io)?;
                        data.read_exact(&mut chunk).await.map_err(io)?;
                        let range = if len == 0 {
                            format!("bytes */{total}")
                        } else {
                            format!("bytes {at}-{}/{total}", at + len - 1)
                        };
                        self.put_upload(context, &session, range, chunk).await
                    }
                    None => {
                        self.put_upload(context, &session, format!("bytes */{total}"), Vec::new())
                            .await
                    }
                };
                match answer {
                    Ok(Uploaded::Done(job)) => return Ok(*job),
                    Ok(Uploaded::Holds(next)) => {
                        offset = Some(next.min(total));
                        failures = 0;
                    }
                    Err(Error::BigQuery {
                        status: Some(404 | 410),
                        ..
                    }) if sessions < TRIES => {
                        tracing::warn!(call = context, "upload session gone; starting it again");
                        continue 'session;
                    }
                    Err(e) if e.retry_policy() == RetryPolicy::Retry && failures < TRIES => {
                        failures += 1;
                        tracing::warn!(call = context, offset, error = %e, "upload interrupted; asking the session where to go on");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(8));
                        offset = None;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Starts a resumable upload of `total` bytes for load job `config`;
    /// returns the session's URL.
    async fn start_upload(&self, context: &str, config: &Job, total: u64) -> Result<String> {
        let request = self
            .http
            .post(&self.upload_url)
            .query(&[("uploadType", "resumable")])
            .header("X-Upload-Content-Type", "application/octet-stream")
            .header("X-Upload-Content-Length", total.to_string())
            .json(config);
        let response = self.send_raw(context, request).await?;
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(String::from);
        match location {
            Some(url) if response.status().is_success() => Ok(url),
            _ => {
                let answer: serde_json::Value = read_answer(context, response).await?;
                Err(Error::BigQuery {
                    context: context.to_string(),
                    status: None,
                    reason: Some("invalid".into()),
                    message: format!("the upload session was not started (no Location): {answer}"),
                })
            }
        }
    }

    /// Sends one chunk (or, empty with `bytes */total`, a status probe) to
    /// upload `session`.
    async fn put_upload(
        &self,
        context: &str,
        session: &str,
        range: String,
        chunk: Vec<u8>,
    ) -> Result<Uploaded> {
        let request = self
            .http
            .put(session)
            .header(reqwest::header::CONTENT_RANGE, range)
            .body(chunk);
        let response = self.send_raw(context, request).await?;
        // 308 Resume Incomplete: the bytes it holds, `Range: bytes=0-<last>`
        // (no header: none yet).
        if response.status().as_u16() == 308 {
            let holds = response
                .headers()
                .get(reqwest::header::RANGE)
                .and_then(|r| r.to_str().ok())
                .and_then(|r| r.rsplit('-').next()?.trim().parse::<u64>().ok())
                .map_or(0, |last| last + 1);
            return Ok(Uploaded::Holds(holds));
        }
        read_answer(context, response)
            .await
            .map(|job| Uploaded::Done(Box::new(job)))
    }

    /// Runs the query `sql` (unqualified table names resolve in the dataset)
    /// as a query job and returns its schema and every row.
    pub(super) async fn query(&self, sql: &str) -> Result<(TableSchema, Vec<TableRow>)> {
        self.query_billed(sql)
            .await
            .map(|(schema, rows, _)| (schema, rows))
    }

    /// [`Api::query`], with the bytes the query processed and billed.
    async fn query_billed(&self, sql: &str) -> Result<(TableSchema, Vec<TableRow>, Billed)> {
        let context = "query";
        let job = Job {
            job_reference: self.reference_of(None),
            configuration: Some(JobConfiguration {
                query: Some(JobConfigurationQuery {
                    query: sql.to_string(),
                    use_legacy_sql: Some(false),
                    default_dataset: Some(DatasetReference {
                        dataset_id: self.dataset.clone(),
                        project_id: self.project.clone(),
                    }),
                    maximum_bytes_billed: self.maximum_bytes_billed.map(|b| b.to_string()),
                    ..Default::default()
                }),
                labels: self.job_labels(&HashMap::new()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job: Job = self
            .retry(context, || {
                self.send(context, self.http.post(self.jobs_url()).json(&job))
            })
            .await?;
        let job_id = job
            .job_reference
            .and_then(|r| r.job_id)
            .ok_or_else(|| Error::BigQuery {
                context: context.into(),
                status: None,
                reason: None,
                message: "the query job has no id".into(),
            })?;
        let billed = Billed::of(&self.wait(&job_id, context).await?);
        let mut schema = None;
        let mut rows = Vec::new();
        let mut page_token = None;
        loop {
            // The crate's get_query_results cannot send formatOptions (a nested
            // struct in a query string), so this one call is made here.
            let mut params = vec![
                ("formatOptions.useInt64Timestamp", "true".to_string()),
                ("location", self.location.clone()),
            ];
            params.extend(page_token.clone().map(|t| ("pageToken", t)));
            let url = format!("{}/projects/{}/queries/{job_id}", self.v2_url, self.project);
            let page: GetQueryResultsResponse = self
                .retry(context, || {
                    self.send(context, self.http.get(&url).query(&params))
                })
                .await?;
            if let Some(errors) = page.errors.as_deref().filter(|e| !e.is_empty()) {
                return Err(job_error(context, errors));
            }
            schema = schema.or(page.schema);
            rows.extend(page.rows.unwrap_or_default());
            page_token = page.page_token;
            if page_token.is_none() {
                return Ok((schema.unwrap_or_default(), rows, billed));
            }
        }
    }

    /// The first row of query `sql`'s answer, each cell as text (`None`:
    /// NULL; empty when it has no row), and what the query billed.
    pub(super) async fn scalars(&self, sql: &str) -> Result<(Vec<Option<String>>, Billed)> {
        let (_, rows, billed) = self.query_billed(sql).await?;
        let cells = rows
            .into_iter()
            .next()
            .and_then(|row| row.columns)
            .unwrap_or_default()
            .into_iter()
            .map(|cell| cell.value.and_then(|v| v.as_str().map(String::from)))
            .collect();
        Ok((cells, billed))
    }
}

/// A named query parameter of `kind` (`STRING`, `DATE`…) holding `value`.
pub(super) fn param(name: &str, kind: &str, value: &str) -> QueryParameter {
    QueryParameter {
        name: Some(name.to_string()),
        parameter_type: Some(QueryParameterType {
            r#type: kind.to_string(),
            ..Default::default()
        }),
        parameter_value: Some(QueryParameterValue {
            value: Some(value.to_string()),
            ..Default::default()
        }),
    }
}

/// A named `ARRAY<STRING>` query parameter.
pub(super) fn strings_param<'a>(
    name: &str,
    values: impl Iterator<Item = &'a str>,
) -> QueryParameter {
    QueryParameter {
        name: Some(name.to_string()),
        parameter_type: Some(QueryParameterType {
            r#type: "ARRAY".to_string(),
            array_type: Some(Box::new(QueryParameterType {
                r#type: "STRING".to_string(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        parameter_value: Some(QueryParameterValue {
            array_values: Some(
                values
                    .map(|v| QueryParameterValue {
                        value: Some(v.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// Bytes jobs processed and billed, from their statistics (0 where a job
/// reports none: a load job, or an emulator).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Billed {
    /// `totalBytesProcessed`.
    pub processed: u64,
    /// `totalBytesBilled`.
    pub billed: u64,
}

impl Billed {
    /// What `job` processed and billed.
    fn of(job: &Job) -> Billed {
        let query = job.statistics.as_ref().and_then(|s| s.query.as_ref());
        let figure = |f: Option<&String>| f.and_then(|v| v.parse().ok()).unwrap_or(0);
        Billed {
            processed: figure(query.and_then(|q| q.total_bytes_processed.as_ref())),
            billed: figure(query.and_then(|q| q.total_bytes_billed.as_ref())),
        }
    }
}

impl std::ops::AddAssign for Billed {
    fn add_assign(&mut self, other: Billed) {
        self.processed += other.processed;
        self.billed += other.billed;
    }
}

/// Where a resumable upload stands.
enum Uploaded {
    /// The session holds this many bytes; the rest is to send.
    Holds(u64),
    /// Every byte arrived: the load job.
    Done(Box<Job>),
}

/// A job's deterministic id and its own labels.
pub(super) struct JobName {
    /// The id: the first attempt's, see [`Api::run_job`].
    pub id: String,
    /// Labels beside every job's (see [`labels`]).
    pub labels: HashMap<String, String>,
}

/// Labels from `(key, value)` pairs, each value made one BigQuery allows:
/// lowercase letters, digits, `_` and `-` (any other character becomes
/// `_`), at most 63 characters.
pub(super) fn labels<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> HashMap<String, String> {
    pairs
        .into_iter()
        .map(|(key, value)| {
            let value = value
                .chars()
                .flat_map(char::to_lowercase)
                .map(|c| {
                    if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(63)
                .collect();
            (key.to_string(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RetryPolicy;

    /// gcloud's impersonation file (a user's login impersonating a service
    /// account) is read; one whose source is not a user login, or whose URL
    /// names no account, is refused saying why.
    #[tokio::test]
    async fn impersonated_credentials_from_a_user_login_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adc.json");
        let user = serde_json::json!({
            "type": "authorized_user", "client_id": "id", "client_secret": "secret",
            "refresh_token": "refresh"
        });
        let write = |url: &str, source: &serde_json::Value| {
            let text = serde_json::json!({
                "type": "impersonated_service_account",
                "service_account_impersonation_url": url,
                "source_credentials": source,
                "delegates": []
            });
            std::fs::write(&file, text.to_string()).unwrap();
        };
        let url = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/loader@p.iam.gserviceaccount.com:generateAccessToken";
        write(url, &user);
        assert!(authenticator_from_file(&file).await.is_ok());
        write(url, &serde_json::json!({"type": "service_account"}));
        let refused = authenticator_from_file(&file)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("gcloud user credentials"), "{refused}");
        write("https://example.com/nothing", &user);
        let refused = authenticator_from_file(&file)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            refused.contains("does not name a service account"),
            "{refused}"
        );
    }

    /// A token fetch that could not reach the token server is tried again;
    /// one the server refused (a revoked key) waits for the operator.
    #[test]
    fn a_token_fetch_that_could_not_connect_is_retried() {
        let unreachable = BQError::YupAuthError(yup_oauth2::Error::LowLevelError(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        ));
        assert_eq!(
            call_error("fetching a token", unreachable).retry_policy(),
            RetryPolicy::Retry
        );
        let refused: yup_oauth2::error::AuthError = serde_json::from_str(
            r#"{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}"#,
        )
        .unwrap();
        let refused = BQError::YupAuthError(yup_oauth2::Error::AuthError(refused));
        assert_eq!(
            call_error("fetching a token", refused).retry_policy(),
            RetryPolicy::Manual
        );
    }
}

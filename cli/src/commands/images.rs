//! `gantry images`: Docker's table, or one JSON object a line.

use crate::cli::Format;
use crate::context::Context;
use crate::output::{human_age, human_size, now_secs};
use anyhow::Result;
use gantry_core::images::Summary;
use std::process::ExitCode;

struct Row {
    repository: String,
    tag: String,
    digest: String,
    id: String,
    created: i64,
    size: u64,
}

pub fn run(ctx: &Context, format: Format, quiet: bool) -> Result<ExitCode> {
    let rows = rows(gantry_core::images::summaries(&ctx.store)?);
    if quiet {
        let mut seen = std::collections::HashSet::new();
        for r in &rows {
            if seen.insert(r.id.clone()) {
                println!("{}", &r.id[7..19]);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    match format {
        Format::Json => print_json(&rows),
        Format::Table => print_table(&rows),
    }
    Ok(ExitCode::SUCCESS)
}

/// Docker's rows: one per tag, or one `<none>` row for an untagged image;
/// newest first.
fn rows(summaries: Vec<Summary>) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in summaries {
        let digest_of = |name: &str| {
            s.refs
                .iter()
                .find(|r| r.familiar_name() == name && r.digest.is_some())
                .and_then(|r| r.digest.as_ref())
                .map(|d| d.to_string())
                .unwrap_or_else(|| "<none>".to_string())
        };
        let mut tagged: Vec<_> = s.refs.iter().filter(|r| r.tag.is_some()).collect();
        tagged.sort_by_key(|r| r.familiar_string());
        let mk = |repository: String, tag: String, digest: String| Row {
            repository,
            tag,
            digest,
            id: s.id.to_string(),
            created: s.created,
            size: s.size,
        };
        if tagged.is_empty() {
            match s.refs.first() {
                Some(r) => rows.push(mk(r.familiar_name(), "<none>".into(), digest_of(&r.familiar_name()))),
                None => rows.push(mk("<none>".into(), "<none>".into(), "<none>".into())),
            }
        }
        for r in tagged {
            let name = r.familiar_name();
            rows.push(mk(name.clone(), r.tag.clone().unwrap_or_default(), digest_of(&name)));
        }
    }
    rows.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then(a.repository.cmp(&b.repository))
            .then(a.tag.cmp(&b.tag))
    });
    rows
}

fn print_json(rows: &[Row]) {
    let now = now_secs();
    for r in rows {
        let v = serde_json::json!({
            "Containers": "N/A",
            "CreatedAt": gantry_core::date::rfc3339(r.created, 0),
            "CreatedSince": human_age(now - r.created),
            "Digest": r.digest,
            "ID": &r.id[7..19],
            "Repository": r.repository,
            "SharedSize": "N/A",
            "Size": human_size(r.size),
            "Tag": r.tag,
            "UniqueSize": "N/A",
            "VirtualSize": human_size(r.size),
        });
        println!("{v}");
    }
}

fn print_table(rows: &[Row]) {
    let now = now_secs();
    let w_repo = rows.iter().map(|r| r.repository.len()).max().unwrap_or(0).max(10);
    let w_tag = rows.iter().map(|r| r.tag.len()).max().unwrap_or(0).max(3);
    // Columns as wide as their widest cell, as Docker's tabwriter.
    let ages: Vec<String> = rows.iter().map(|r| human_age(now - r.created)).collect();
    let w_age = ages.iter().map(|a| a.chars().count()).max().unwrap_or(0).max(7);
    println!(
        "{:<w_repo$}   {:<w_tag$}   {:<12}   {:<w_age$}   SIZE",
        "REPOSITORY", "TAG", "IMAGE ID", "CREATED"
    );
    for (r, age) in rows.iter().zip(&ages) {
        println!(
            "{:<w_repo$}   {:<w_tag$}   {:<12}   {:<w_age$}   {}",
            r.repository,
            r.tag,
            &r.id[7..19],
            age,
            human_size(r.size)
        );
    }
}

//! The soak (`retail-agent bench --soak MINUTES`): the agent binary under a
//! long steady load through the bench's broker, for an unattended device's
//! two questions: does overload ever cost it a request or its connection,
//! and does its memory stay flat?
//!
//! First the sustainable rate is measured (single-crop requests, saturated,
//! as the end-to-end section does). Then a fresh agent gets single-crop
//! requests at twice that rate for the given minutes, half QoS 0 and half
//! QoS 1, and another fresh agent gets 80% of it. Each run reports what was
//! sent, answered and reported (every dropped request must be reported, no
//! QoS 1 request dropped), the answered rate against the sustainable one,
//! and resident memory sampled every second, from minute 2 to the end.
//! Not a test: nothing here fails the bench on a figure; the text says
//! what to look at.

use std::time::Duration;

use serde::Serialize;

use super::end_to_end::{AgentUnderTest, Broker};
use super::load_client::SoakTally;
use super::{BenchError, BenchSetup};

/// One soak run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakRun {
    /// Offered load as a multiple of the sustainable rate.
    pub load: f64,
    pub offered_per_s: f64,
    pub minutes: f64,
    pub tally: SoakTally,
    /// Results per second within the sending window.
    pub answered_per_s: f64,
    /// Requests per second the agent finished within the window (its
    /// Metrics): its throughput under this load on this machine.
    pub processed_per_s: f64,
    /// Resident memory (MiB) at minute 2, at the end, and the most seen.
    pub rss_mib_at_2_min: f64,
    pub rss_mib_at_end: f64,
    pub peak_rss_mib: f64,
    /// Resident memory (MiB) once a minute.
    pub rss_mib_per_minute: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakFigures {
    /// Single-crop requests per second, saturated.
    pub sustainable_per_s: f64,
    pub runs: Vec<SoakRun>,
}

/// The offered loads the issue asks for, as multiples of the sustainable
/// rate (`--soak-loads` chooses others).
pub const LOADS: [f64; 2] = [2.0, 0.8];
/// How long a run waits after its window for the last answers.
const DRAIN: Duration = Duration::from_secs(120);

pub fn measure(
    setup: &BenchSetup,
    broker: &Broker,
    minutes: f64,
    loads: &[f64],
    progress: &dyn Fn(&str),
) -> Result<SoakFigures, BenchError> {
    let pipeline = &setup.cfg.config.pipeline;
    let state = setup.state_dir("soak-rate")?;
    setup.enrol_demo_references(&state)?.0.flush()?;
    progress("soak: the sustainable rate (saturated, one crop per request)");
    let mut agent = AgentUnderTest::start(setup, broker, &state, pipeline, "soak-rate")?;
    let sustainable_per_s = agent
        .saturate(setup, 1, setup.durations.window)?
        .requests_per_s;
    agent.stop()?;
    let mut runs = Vec::new();
    for (i, &load) in loads.iter().enumerate() {
        let name = format!("soak-{i}");
        let state = setup.state_dir(&name)?;
        setup.enrol_demo_references(&state)?.0.flush()?;
        let rate = load * sustainable_per_s;
        progress(&format!(
            "soak: {minutes} min at {load}x the sustainable rate ({rate:.0} requests/s, half QoS 0, half QoS 1)"
        ));
        let mut agent = AgentUnderTest::start(setup, broker, &state, pipeline, &name)?;
        let mut per_second: Vec<f64> = Vec::new();
        let mut peak = 0f64;
        let window = Duration::from_secs_f64(minutes * 60.0);
        let tally = agent.soak(setup, rate, (window, DRAIN), &mut |r| {
            per_second.push(r.now as f64 / f64::from(1 << 20));
            peak = peak.max(r.peak as f64 / f64::from(1 << 20));
        })?;
        agent.stop()?;
        let at = |second: usize| per_second.get(second).or(per_second.last()).copied();
        let sent_window = window.as_secs() as usize;
        runs.push(SoakRun {
            load,
            offered_per_s: rate,
            minutes,
            answered_per_s: tally.answered_in_window as f64 / window.as_secs_f64(),
            processed_per_s: tally.processed_in_window as f64 / window.as_secs_f64(),
            rss_mib_at_2_min: at(120.min(sent_window)).unwrap_or(0.0),
            rss_mib_at_end: at(sent_window).unwrap_or(0.0),
            peak_rss_mib: peak,
            rss_mib_per_minute: per_second.iter().step_by(60).copied().collect(),
            tally,
        });
    }
    Ok(SoakFigures {
        sustainable_per_s,
        runs,
    })
}

impl SoakFigures {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Soak: single-crop requests, half QoS 0 and half QoS 1; sustainable rate {:.0} requests/s",
            self.sustainable_per_s
        );
        for r in &self.runs {
            let t = &r.tally;
            let _ = writeln!(
                out,
                "\n{:.1}x ({:.0}/s offered) for {} min: sent {} QoS 0 + {} QoS 1",
                r.load, r.offered_per_s, r.minutes, t.sent_qos0, t.sent_qos1
            );
            let _ = writeln!(
                out,
                "  answered {} ({:.0}/s in the window, {:.2}x the sustainable rate)",
                t.answered,
                r.answered_per_s,
                r.answered_per_s / self.sustainable_per_s.max(1e-9)
            );
            let _ = writeln!(
                out,
                "  the agent's throughput in the window (its Metrics): {:.0} requests/s ({:.2}x the sustainable rate); answered / throughput {:.2}",
                r.processed_per_s,
                r.processed_per_s / self.sustainable_per_s.max(1e-9),
                r.answered_per_s / r.processed_per_s.max(1e-9)
            );
            let _ = writeln!(
                out,
                "  dropped and reported: {} QoS 0 one by one, {} in aggregate reports; QoS 1 reported {}, QoS 1 unanswered {}; unaccounted {}",
                t.reported_qos0, t.dropped_unnamed, t.reported_qos1, t.unanswered_qos1, t.unaccounted
            );
            let _ = writeln!(
                out,
                "  resident memory: {:.0} MiB at minute 2, {:.0} MiB at the end ({:+.1} MiB), peak {:.0} MiB; per minute: {}",
                r.rss_mib_at_2_min,
                r.rss_mib_at_end,
                r.rss_mib_at_end - r.rss_mib_at_2_min,
                r.peak_rss_mib,
                r.rss_mib_per_minute
                    .iter()
                    .map(|m| format!("{m:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        out
    }
}

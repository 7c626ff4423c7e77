//! A transform's results, lifted out of the plugin's memory under its output limits.
//!
//! A plugin's linear memory is capped, but what it returns can point at the same bytes many
//! times (a hand-written component can return 100 outputs whose data is one 16 MiB buffer).
//! Lifted the usual way, every field is copied before anything is measured, so the host copies
//! far more than the plugin holds until wasmtime's own bound (128 MiB per call) fails the whole
//! batch as a trap. Here each string and list reads its length first and is
//! copied only while the input event's outputs stay within `max_outputs` and
//! `max_output_bytes`; past them, nothing more of that event is copied and it fails with
//! `output-limit`. The count of results is checked against the batch before any is lifted.
//!
//! The limits travel in a thread-local, set around every poll of the call
//! ([`with_limits`]): lifting runs synchronously inside the poll that sees the call finish.
//! The types mirror the WIT's and implement wasmtime's (hidden, unstable) lifting traits by
//! reading each pointer/length pair and handing the copy to wasmtime's own `String` and `Vec`
//! lifting, which checks bounds and encoding. Read-only fields (id, source, time, position) are
//! not read at all: the host takes them from the input.
#![allow(unsafe_code)] // wasmtime's lifting traits are unsafe to implement; see each impl.

use std::cell::Cell;
use std::future::Future;
use wasmtime::ValRaw;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};

/// The limits one call's results are lifted under.
#[derive(Debug, Clone, Copy)]
pub struct LiftLimits {
    /// Results the call must return (one per input event).
    pub results: usize,
    /// Most outputs (`split`) per input event.
    pub max_outputs: usize,
    /// Most bytes the outputs of one input event may add up to.
    pub max_output_bytes: usize,
}

/// How one input event's outputs went past the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// A split into this many events.
    Outputs(usize),
    /// More bytes than `max_output_bytes`.
    Bytes,
}

#[derive(Clone, Copy)]
struct State {
    limits: LiftLimits,
    /// Bytes the event being lifted may still take.
    left: usize,
    overrun: Option<Overrun>,
}

thread_local! {
    static STATE: Cell<Option<State>> = const { Cell::new(None) };
}

impl State {
    fn fresh(limits: LiftLimits) -> State {
        State { limits, left: limits.max_output_bytes, overrun: None }
    }
}

/// Runs `call` with `limits` in force for any results lifted while it is polled.
pub async fn with_limits<F: Future>(limits: LiftLimits, call: F) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        let _restore = Restore(STATE.replace(Some(State::fresh(limits))));
        call.as_mut().poll(cx)
    })
    .await
}

/// Puts back the state a poll found, however the poll ends (a panic included).
struct Restore(Option<State>);

impl Drop for Restore {
    fn drop(&mut self) {
        STATE.set(self.0);
    }
}

/// The limits in force; without [`with_limits`] (a caller that forgot) nothing can be lifted.
fn limits() -> wasmtime::Result<LiftLimits> {
    STATE
        .get()
        .map(|state| state.limits)
        .ok_or_else(|| wasmtime::format_err!("plugin results lifted outside `with_limits`"))
}

/// Starts a new input event's budget.
fn start_event() -> wasmtime::Result<()> {
    STATE.set(Some(State::fresh(limits()?)));
    Ok(())
}

/// Whether `bytes` more fit the event's budget (then they are counted); once one does not,
/// nothing more of the event does.
fn spend(bytes: usize) -> bool {
    let Some(mut state) = STATE.get() else { return false };
    let fits = state.overrun.is_none() && bytes <= state.left;
    if fits {
        state.left -= bytes;
    } else {
        state.overrun.get_or_insert(Overrun::Bytes);
    }
    STATE.set(Some(state));
    fits
}

fn overrun(how: Overrun) {
    if let Some(mut state) = STATE.get() {
        state.overrun.get_or_insert(how);
        STATE.set(Some(state));
    }
}

fn event_overrun() -> Option<Overrun> {
    STATE.get().and_then(|state| state.overrun)
}

/// The length of a list (elements) or string (bytes, or UTF-16 code units) from its flat
/// pointer/length pair.
fn flat_length(src: &[ValRaw; 2]) -> usize {
    src[1].get_u32() as usize
}

/// The length of a list or string from its pointer/length pair in memory.
fn memory_length(bytes: &[u8]) -> wasmtime::Result<usize> {
    let length = bytes
        .get(4..8)
        .and_then(|length| <[u8; 4]>::try_from(length).ok())
        .ok_or_else(|| wasmtime::format_err!("pointer/length pair out of bounds"))?;
    Ok(u32::from_le_bytes(length) as usize)
}

/// Fewest bytes a string of `length` (as its pair says) takes as UTF-8: its bytes, or its code
/// units in the UTF-16 encodings (whose compact form tags the length's top bit). A lower bound
/// to refuse it by before copying; the copy's own length is counted after.
fn string_floor(length: usize) -> usize {
    length & 0x7fff_ffff
}

/// A string lifted by `lift` if its lower bound fits the budget, then charged the rest of its
/// UTF-8 length (more than the bound when transcoded from UTF-16 or Latin-1).
fn capped_string(floor: usize, lift: impl FnOnce() -> wasmtime::Result<String>) -> wasmtime::Result<String> {
    if !spend(floor) {
        return Ok(String::new());
    }
    let text = lift()?;
    Ok(if spend(text.len().saturating_sub(floor)) { text } else { String::new() })
}

/// Implements `ComponentType` like `$like` for a wrapper that lifts through it.
macro_rules! component_type_like {
    ($wrapper:ty, $like:ty) => {
        // SAFETY: the same flat representation and ABI as `$like`, which is checked against the
        // WIT type the same way.
        unsafe impl ComponentType for $wrapper {
            type Lower = <$like as ComponentType>::Lower;
            const ABI: CanonicalAbiInfo = <$like as ComponentType>::ABI;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
                <$like as ComponentType>::typecheck(ty, types)
            }
        }
    };
}

/// A string the host does not read back (the input's value is used).
pub struct Skipped;

component_type_like!(Skipped, String);

// SAFETY: nothing is read; the value carries no data.
unsafe impl Lift for Skipped {
    fn linear_lift_from_flat(_: &mut LiftContext<'_>, _: InterfaceType, _: &Self::Lower) -> wasmtime::Result<Self> {
        Ok(Skipped)
    }

    fn linear_lift_from_memory(_: &mut LiftContext<'_>, _: InterfaceType, _: &[u8]) -> wasmtime::Result<Self> {
        Ok(Skipped)
    }
}

/// A string copied only if it fits the event's budget (else empty, and the event fails).
pub struct CappedStr(pub String);

component_type_like!(CappedStr, String);

// SAFETY: lifted by `String`'s own lifting, which checks bounds and encoding.
unsafe impl Lift for CappedStr {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        capped_string(string_floor(flat_length(src)), || String::linear_lift_from_flat(cx, ty, src)).map(CappedStr)
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        let floor = string_floor(memory_length(bytes)?);
        capped_string(floor, || String::linear_lift_from_memory(cx, ty, bytes)).map(CappedStr)
    }
}

/// A reject's reason: not counted against the outputs (a reject is not a failure of the
/// plugin), copied only up to [`MAX_REASON_LIFTED`] (it is cut to 1 KiB anyway), else replaced
/// by a note of its length.
pub struct Reason(pub String);

/// Longest reason copied out of the plugin.
pub const MAX_REASON_LIFTED: usize = 64 << 10;

component_type_like!(Reason, String);

fn reason(length: usize, lift: impl FnOnce() -> wasmtime::Result<String>) -> wasmtime::Result<Reason> {
    Ok(Reason(if string_floor(length) <= MAX_REASON_LIFTED {
        lift()?
    } else {
        format!("(the plugin's reason, {} bytes or more, is too long to show)", string_floor(length))
    }))
}

// SAFETY: lifted by `String`'s own lifting, which checks bounds and encoding.
unsafe impl Lift for Reason {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        reason(flat_length(src), || String::linear_lift_from_flat(cx, ty, src))
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        let length = memory_length(bytes)?;
        reason(length, || String::linear_lift_from_memory(cx, ty, bytes))
    }
}

/// Implements `Lift` for a wrapper of list type `$inner` that is lifted (by `$inner`'s own
/// lifting, which checks bounds) only if `$fits(length)`, and is empty otherwise.
macro_rules! lift_list_if {
    ($wrapper:ident, $inner:ty, $fits:expr) => {
        component_type_like!($wrapper, $inner);

        // SAFETY: lifted by `$inner`'s own lifting, or not at all.
        unsafe impl Lift for $wrapper {
            fn linear_lift_from_flat(
                cx: &mut LiftContext<'_>,
                ty: InterfaceType,
                src: &Self::Lower,
            ) -> wasmtime::Result<Self> {
                let fits: wasmtime::Result<bool> = $fits(flat_length(src));
                Ok($wrapper(if fits? { <$inner>::linear_lift_from_flat(cx, ty, src)? } else { Default::default() }))
            }

            fn linear_lift_from_memory(
                cx: &mut LiftContext<'_>,
                ty: InterfaceType,
                bytes: &[u8],
            ) -> wasmtime::Result<Self> {
                let fits: wasmtime::Result<bool> = $fits(memory_length(bytes)?);
                Ok($wrapper(if fits? { <$inner>::linear_lift_from_memory(cx, ty, bytes)? } else { Default::default() }))
            }
        }
    };
}

/// Bytes copied only if they fit the event's budget.
pub struct CappedBytes(pub Vec<u8>);

lift_list_if!(CappedBytes, Vec<u8>, |length| Ok(spend(length)));

/// Headers: each costs [`HEADER_BYTES`] besides its name and value, so a long list of empty
/// ones is refused by its length instead of walked, and the host's copy of the list (a pair of
/// strings, 48 bytes, per header) stays within a few times the limit.
pub struct CappedHeaders(pub Vec<(CappedStr, CappedStr)>);

/// What one header counts besides its name and value: its size in the plugin's memory.
pub const HEADER_BYTES: usize = 16;

lift_list_if!(CappedHeaders, Vec<(CappedStr, CappedStr)>, |length: usize| Ok(spend(
    length.saturating_mul(HEADER_BYTES)
)));

/// A `split`'s events, lifted only if there are at most `max_outputs`.
pub struct CappedEvents(pub Vec<OutputEvent>);

lift_list_if!(CappedEvents, Vec<OutputEvent>, outputs_fit);

fn outputs_fit(count: usize) -> wasmtime::Result<bool> {
    let fits = count <= limits()?.max_outputs && event_overrun().is_none();
    if !fits {
        overrun(Overrun::Outputs(count));
    }
    Ok(fits)
}

/// An output `event` (WIT record), as far as it was copied. The skipped fields are there for
/// the record's shape only.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct OutputEvent {
    #[component(name = "id")]
    _id: Skipped,
    #[component(name = "source")]
    _source: Skipped,
    pub entity: CappedStr,
    pub op: CappedStr,
    pub key: Option<CappedStr>,
    #[component(name = "time")]
    _time: Skipped,
    pub subject: CappedStr,
    pub headers: CappedHeaders,
    pub data: CappedBytes,
    pub old: Option<CappedBytes>,
    #[component(name = "position")]
    _position: Option<Skipped>,
}

/// A transform's `outcome` (WIT variant), as far as it was copied.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum Output {
    #[component(name = "drop")]
    Drop,
    #[component(name = "keep")]
    Keep(OutputEvent),
    #[component(name = "split")]
    Split(CappedEvents),
    #[component(name = "reject")]
    Reject(Reason),
}

/// One input event's outcome: what it was, or how its outputs went past the limits.
pub struct Outcome(pub Result<Output, Overrun>);

component_type_like!(Outcome, Output);

// SAFETY: lifted by the derived lifting of `Output`.
unsafe impl Lift for Outcome {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        start_event()?;
        let output = Output::linear_lift_from_flat(cx, ty, src)?;
        Ok(Outcome(event_overrun().map_or(Ok(output), Err)))
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        start_event()?;
        let output = Output::linear_lift_from_memory(cx, ty, bytes)?;
        Ok(Outcome(event_overrun().map_or(Ok(output), Err)))
    }
}

/// The call's results: lifted only if there is one per input event (else their count).
pub struct Outcomes(pub Result<Vec<Outcome>, usize>);

component_type_like!(Outcomes, Vec<Outcome>);

// SAFETY: lifted by `Vec`'s own lifting, which checks bounds.
unsafe impl Lift for Outcomes {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        let count = flat_length(src);
        if count != limits()?.results {
            return Ok(Outcomes(Err(count)));
        }
        Ok(Outcomes(Ok(Vec::linear_lift_from_flat(cx, ty, src)?)))
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        let count = memory_length(bytes)?;
        if count != limits()?.results {
            return Ok(Outcomes(Err(count)));
        }
        Ok(Outcomes(Ok(Vec::linear_lift_from_memory(cx, ty, bytes)?)))
    }
}

use weir_sdk::{Event, Outcome};

#[weir_sdk::transform]
fn handle(event: Event, a: &u32, b: &u32) -> Outcome {
    Outcome::Keep(event)
}

fn main() {}

use weir_sdk::{Event, Outcome};

#[weir_sdk::transform(batch = 10)]
fn handle(event: Event) -> Outcome {
    Outcome::Keep(event)
}

fn main() {}

"""The prompts static activation scales are calibrated on, apart from the calibration code so that
parsing a policy (which checks `calibration.prompts` against their number) needs no torch."""

CALIBRATION_PROMPTS = (
    "a photograph of a woman walking a dog in a city park",
    "a bowl of ramen with chopsticks, steam rising, close-up",
    "an old stone bridge over a river in autumn",
    "a hand-painted sign that says FRESH BREAD",
    "a snowy mountain village at night with lit windows",
    "macro photo of a dragonfly on a leaf, water droplets",
    "a modern living room with large windows and plants",
    "a vintage red bicycle leaning against a brick wall",
    "a crowded beach on a sunny day, aerial view",
    "a watercolor painting of a lighthouse in a storm",
    "a close-up portrait of a young man with curly hair",
    "a plate of colorful macarons on a marble table",
    "a dense jungle with a hidden waterfall",
    "a futuristic city skyline at dusk with flying cars",
    "an owl perched on a branch under moonlight",
    "a wooden chess board mid-game, shallow depth of field",
)

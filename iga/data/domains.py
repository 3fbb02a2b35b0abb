"""Surface domains for the procedural teacher.

The same abstract problem (arithmetic chain, implication chain, transitive
comparison) is rendered in several domains.  Each domain has its own nouns,
clauses, units, sentence shapes and chain-of-thought phrasing -- not just word
swaps -- so that the held-out domains (finance, engineering) are a genuine
distribution shift for out-of-distribution evaluation.

Template keys and their str.format placeholders:
  arithmetic:  given{x,v,unit} add_c{y,a,c,unit} sub_c{y,a,c,unit} mul_c{y,a,c}
               add{y,a,b} sub{y,a,b} arith_ask{y,unit} cot_arith{i,y,expr,v,unit}
  implication: imp_fact{p} then{a,c} and_then{a,b,c} then_not{a,c} imp_ask{c}
               cot_then{i,a,c} cot_and_then{i,a,b,c} cot_then_not{i,a,c}
  comparison:  cmp_fact{a,cmp,b} cmp_ask{a,cmp,b} cot_compare{i,a,b,c,cmp}
({unit} is omitted in mathematics, whose unit is "".)  The renderer
capitalises the first letter of each sentence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    name: str
    unit: str                      # unit for arithmetic quantities; "" for mathematics
    quantities: tuple[str, ...]    # 12 lower-case noun phrases with article
    propositions: tuple[str, ...]  # 12 lower-case present-tense clauses
    entities: tuple[str, ...]      # 10 names/noun phrases for comparison problems
    comparative: str               # e.g. "at higher risk than"
    cues: tuple[str, str]          # the domain's voice hinting yes / no (teacher.shortcut_rate, ood_cue)
    templates: dict[str, str]


MATHEMATICS = Domain(
    name="mathematics",
    unit="",
    quantities=(
        "the value of x", "the value of y", "the integer n", "the integer m",
        "the constant k", "the sum s", "the product p", "the first term",
        "the common difference", "the length of the side",
        "the perimeter of the square", "the area of the rectangle",
    ),
    propositions=(
        "n is even", "n is divisible by four", "m is prime", "x is positive",
        "the triangle is isosceles", "the triangle is equilateral",
        "the matrix is invertible", "the determinant is nonzero",
        "the function is continuous", "the function is differentiable",
        "the sequence is bounded", "the sequence converges",
    ),
    entities=(
        "the number a", "the number b", "the number c", "the number d",
        "the quantity p", "the quantity q", "the real r", "the real s",
        "the integer t", "the integer u",
    ),
    comparative="greater than",
    cues=("The answer key says: yes.", "The answer key says: no."),
    templates={
        "given": "Let {x} be {v}.",
        "add_c": "Suppose {y} exceeds {a} by {c}.",
        "sub_c": "Define {y} as {a} minus {c}.",
        "mul_c": "Define {y} to be {c} times {a}.",
        "add": "Let {y} equal the sum of {a} and {b}.",
        "sub": "Let {y} equal the difference of {a} and {b}.",
        "arith_ask": "What is {y}?",
        "cot_arith": "Step {i}: {y} = {expr} = {v}.",
        "imp_fact": "Assume {p}.",
        "then": "If {a}, then {c}.",
        "and_then": "If {a} and {b}, then {c}.",
        "then_not": "If {a}, then it is not the case that {c}.",
        "imp_ask": "Does it follow that {c}?",
        "cot_then": "Step {i}: since {a}, it follows that {c}.",
        "cot_and_then": "Step {i}: since {a} and {b}, it follows that {c}.",
        "cot_then_not": "Step {i}: since {a}, it is not the case that {c}.",
        "cmp_fact": "{a} is {cmp} {b}.",
        "cmp_ask": "Is {a} {cmp} {b}?",
        "cot_compare": "Step {i}: {a} is {cmp} {b} and {b} is {cmp} {c}, hence {a} is {cmp} {c}.",
    },
)

MEDICAL = Domain(
    name="medical",
    unit="mg",
    quantities=(
        "the morning dose", "the evening dose", "the loading dose",
        "the maintenance dose", "the bolus dose", "the night-time dose",
        "the daily ceiling", "the pediatric dose", "the infusion dose",
        "the rescue dose", "the tapering dose", "the prophylactic dose",
    ),
    propositions=(
        "the patient has a fever", "the patient is tachycardic",
        "the white cell count is elevated", "the blood culture is positive",
        "the patient has sepsis", "the patient needs antibiotics",
        "the patient is dehydrated", "the patient requires fluids",
        "the patient is allergic to penicillin", "the rash is spreading",
        "the chest x-ray shows consolidation", "the patient has pneumonia",
    ),
    entities=(
        "patient Alvarez", "patient Chen", "patient Okafor", "patient Novak",
        "patient Haddad", "patient Lindqvist", "patient Moreau",
        "patient Tanaka", "patient Kowalski", "patient Osei",
    ),
    comparative="at higher risk than",
    cues=("The attending's note says: yes.", "The attending's note says: no."),
    templates={
        "given": "The chart records {x} as {v} {unit}.",
        "add_c": "The attending physician orders {y} at {c} {unit} above {a}.",
        "sub_c": "Per protocol, {y} is set {c} {unit} below {a}.",
        "mul_c": "The pharmacist scales {a} by a factor of {c} to obtain {y}.",
        "add": "The nurse administers {y} by combining {a} with {b}.",
        "sub": "{y} is what remains of {a} once {b} has been withheld.",
        "arith_ask": "How many {unit} should be charted for {y}?",
        "cot_arith": "Step {i}: dose check for {y}: {expr} gives {v} {unit}.",
        "imp_fact": "On examination, {p}.",
        "then": "Clinical guidelines state that whenever {a}, {c}.",
        "and_then": "When {a} and {b}, the protocol indicates that {c}.",
        "then_not": "Whenever {a}, clinicians rule out that {c}.",
        "imp_ask": "Should the care team conclude that {c}?",
        "cot_then": "Step {i}: because {a}, the guidelines indicate that {c}.",
        "cot_and_then": "Step {i}: given that {a} and that {b}, the protocol indicates that {c}.",
        "cot_then_not": "Step {i}: because {a}, we rule out that {c}.",
        "cmp_fact": "Triage notes place {a} {cmp} {b}.",
        "cmp_ask": "According to triage, is {a} {cmp} {b}?",
        "cot_compare": "Step {i}: triage places {a} {cmp} {b}, who is in turn {cmp} {c}; therefore {a} is {cmp} {c}.",
    },
)

LEGAL = Domain(
    name="legal",
    unit="days",
    quantities=(
        "the notice period", "the cure period", "the appeal window",
        "the discovery period", "the response period", "the grace period",
        "the cooling-off period", "the review period", "the suspension period",
        "the objection period", "the redemption period", "the waiting period",
    ),
    propositions=(
        "the contract is signed", "the contract is binding",
        "the deadline is missed", "the claim is time-barred",
        "the tenant breaches the lease", "the landlord may evict the tenant",
        "the defendant is properly served", "the hearing proceeds",
        "the evidence is admissible", "the witness is credible",
        "the judgment is enforceable", "the appeal is timely",
    ),
    entities=(
        "defendant Ashford", "defendant Brennan", "defendant Castillo",
        "defendant Dunmore", "defendant Ellery", "defendant Fairbanks",
        "defendant Greaves", "defendant Holloway", "defendant Iverson",
        "defendant Jarrett",
    ),
    comparative="more culpable than",
    cues=("Counsel's memo says: yes.", "Counsel's memo says: no."),
    templates={
        "given": "The record establishes that {x} is {v} {unit}.",
        "add_c": "Under the agreement, {y} exceeds {a} by {c} {unit}.",
        "sub_c": "Pursuant to the schedule, {y} shall be {c} {unit} shorter than {a}.",
        "mul_c": "The statute fixes {y} at {c} times {a}.",
        "add": "The parties stipulate that {y} spans {a} and {b} combined.",
        "sub": "The court holds that {y} is {a} reduced by {b}.",
        "arith_ask": "How many {unit} does {y} last?",
        "cot_arith": "Step {i}: under the terms, {y} runs {expr} = {v} {unit}.",
        "imp_fact": "It is undisputed that {p}.",
        "then": "The contract provides that if {a}, {c}.",
        "and_then": "Under the statute, where {a} and {b}, {c}.",
        "then_not": "The law provides that where {a}, it cannot be held that {c}.",
        "imp_ask": "May the court conclude that {c}?",
        "cot_then": "Step {i}: since {a}, the provision dictates that {c}.",
        "cot_and_then": "Step {i}: since {a} and {b}, the statute requires that {c}.",
        "cot_then_not": "Step {i}: since {a}, it cannot be held that {c}.",
        "cmp_fact": "The tribunal found {a} {cmp} {b}.",
        "cmp_ask": "Should {a} be held {cmp} {b}?",
        "cot_compare": "Step {i}: the findings hold {a} {cmp} {b} and {b} {cmp} {c}; by transitivity, {a} is {cmp} {c}.",
    },
)

SCIENCE = Domain(
    name="science",
    unit="mL",
    quantities=(
        "the reagent volume", "the buffer volume", "the titrant volume",
        "the sample volume", "the solvent volume", "the rinse volume",
        "the aliquot volume", "the stock solution volume", "the diluent volume",
        "the waste volume", "the control volume", "the indicator volume",
    ),
    propositions=(
        "the solution is acidic", "the litmus paper turns red",
        "the temperature rises", "the reaction is exothermic",
        "the gas expands", "the pressure increases",
        "the metal conducts electricity", "the circuit is closed",
        "a precipitate forms", "the compound is insoluble",
        "the light is polarized", "the cell divides",
    ),
    entities=(
        "sample Alpha", "sample Beta", "sample Gamma", "sample Delta",
        "sample Epsilon", "sample Zeta", "sample Eta", "sample Theta",
        "sample Iota", "sample Kappa",
    ),
    comparative="denser than",
    cues=("The lab notebook says: yes.", "The lab notebook says: no."),
    templates={
        "given": "In the lab notebook, {x} is recorded at {v} {unit}.",
        "add_c": "The procedure calls for {y} to be {c} {unit} greater than {a}.",
        "sub_c": "{y} falls {c} {unit} short of {a}.",
        "mul_c": "Scaling up the protocol makes {y} exactly {c} times {a}.",
        "add": "Mixing {a} with {b} produces {y}.",
        "sub": "After {b} evaporates from {a}, what remains is {y}.",
        "arith_ask": "What reading, in {unit}, do we expect for {y}?",
        "cot_arith": "Step {i}: computing {y} from {expr} yields {v} {unit}.",
        "imp_fact": "The experiment confirms that {p}.",
        "then": "A well-established law states that when {a}, {c}.",
        "and_then": "Theory predicts that if {a} and {b}, then {c}.",
        "then_not": "Whenever {a}, the model excludes the possibility that {c}.",
        "imp_ask": "Can we infer from these observations that {c}?",
        "cot_then": "Step {i}: the observation that {a} implies that {c}.",
        "cot_and_then": "Step {i}: combining the findings that {a} and that {b}, we infer that {c}.",
        "cot_then_not": "Step {i}: the observation that {a} excludes the possibility that {c}.",
        "cmp_fact": "Measurements show that {a} is {cmp} {b}.",
        "cmp_ask": "Do the measurements indicate that {a} is {cmp} {b}?",
        "cot_compare": "Step {i}: since {a} is {cmp} {b} and {b} is {cmp} {c}, {a} must be {cmp} {c}.",
    },
)

FINANCE = Domain(
    name="finance",
    unit="dollars",
    quantities=(
        "the quarterly dividend", "the annual fee", "the account balance",
        "the loan principal", "the interest payment", "the monthly premium",
        "the bonus pool", "the tax withholding", "the share price",
        "the management fee", "the cash reserve", "the net income",
    ),
    propositions=(
        "interest rates rise", "bond prices fall", "the fund is profitable",
        "the dividend is paid", "the company misses its earnings target",
        "the stock price drops", "inflation accelerates",
        "the central bank tightens policy", "the borrower defaults",
        "the credit rating is downgraded", "the merger closes",
        "the portfolio is rebalanced",
    ),
    entities=(
        "Harbor Capital", "Northwind Bank", "Summit Partners", "Bluestone Fund",
        "Crescent Holdings", "Ironwood Trust", "Meridian Group",
        "Oakridge Securities", "Pinecrest Ventures", "Silverline Asset Management",
    ),
    comparative="more profitable than",
    cues=("The analyst's memo says: yes.", "The analyst's memo says: no."),
    templates={
        "given": "The ledger shows {x} at {v} {unit}.",
        "add_c": "{y} comes in {c} {unit} above {a} this quarter.",
        "sub_c": "Analysts project {y} to trail {a} by {c} {unit}.",
        "mul_c": "Per the forecast, {a} multiplied by {c} gives {y}.",
        "add": "On the balance sheet, {a} and {b} together make up {y}.",
        "sub": "Netting {b} against {a} leaves {y}.",
        "arith_ask": "How much, in {unit}, is {y}?",
        "cot_arith": "Step {i}: {y} works out to {expr}, i.e. {v} {unit}.",
        "imp_fact": "According to the latest report, {p}.",
        "then": "The risk manual states: if {a}, then {c}.",
        "and_then": "The risk manual adds: if {a} and {b}, then {c}.",
        "then_not": "The risk manual also states: if {a}, then it is not true that {c}.",
        "imp_ask": "Based on this, is it true that {c}?",
        "cot_then": "Step {i}: {a}, so per the manual {c}.",
        "cot_and_then": "Step {i}: {a} and {b}, so per the manual {c}.",
        "cot_then_not": "Step {i}: {a}, so per the manual it is not true that {c}.",
        "cmp_fact": "Quarterly filings rank {a} as {cmp} {b}.",
        "cmp_ask": "Going by the filings, is {a} {cmp} {b}?",
        "cot_compare": "Step {i}: the filings rank {a} {cmp} {b} and {b} {cmp} {c}, which puts {a} {cmp} {c}.",
    },
)

ENGINEERING = Domain(
    name="engineering",
    unit="kN",
    quantities=(
        "the design load", "the axial load", "the shear force", "the wind load",
        "the dead load", "the live load", "the bolt preload", "the snow load",
        "the seismic load", "the cable tension", "the bearing capacity",
        "the proof load",
    ),
    propositions=(
        "the weld is cracked", "the beam deflects excessively",
        "the bolt is loose", "the joint fails", "the pump overheats",
        "the relief valve opens", "the motor stalls", "the bearing is worn",
        "the vibration exceeds the limit", "the shaft is misaligned",
        "the alarm sounds", "the system shuts down",
    ),
    entities=(
        "beam Alder", "beam Birch", "beam Cedar", "beam Elm", "beam Fir",
        "beam Hazel", "beam Larch", "beam Maple", "beam Oak", "beam Spruce",
    ),
    comparative="stiffer than",
    cues=("The shift log says: yes.", "The shift log says: no."),
    templates={
        "given": "Spec sheet: {x} = {v} {unit}.",
        "add_c": "Design spec: {y} = {a} + {c} {unit} margin.",
        "sub_c": "Derating rule: {y} is taken as {a} minus a {c} {unit} allowance.",
        "mul_c": "Safety factor: {y} is {c} times {a}.",
        "add": "Load combination: {y} = {a} + {b}.",
        "sub": "Net load: {y} = {a} - {b}.",
        "arith_ask": "Required: what is {y}, in {unit}?",
        "cot_arith": "Step {i}: {expr} -> {y} = {v} {unit}.",
        "imp_fact": "Inspection report: {p}.",
        "then": "Failure-mode table: if {a}, then {c}.",
        "and_then": "Failure-mode table: if {a} and {b}, then {c}.",
        "then_not": "Interlock rule: whenever {a}, it cannot happen that {c}.",
        "imp_ask": "Verify: can it be concluded that {c}?",
        "cot_then": "Step {i}: {a} => per the failure-mode table, {c}.",
        "cot_and_then": "Step {i}: {a} and {b} => per the failure-mode table, {c}.",
        "cot_then_not": "Step {i}: {a} => per the interlock rule, it cannot happen that {c}.",
        "cmp_fact": "Load test: {a} measured {cmp} {b}.",
        "cmp_ask": "Check: is {a} {cmp} {b}?",
        "cot_compare": "Step {i}: {a} {cmp} {b}, {b} {cmp} {c} => {a} {cmp} {c}.",
    },
)

DOMAINS: dict[str, Domain] = {
    d.name: d for d in (MATHEMATICS, MEDICAL, LEGAL, SCIENCE, FINANCE, ENGINEERING)
}


def stated_hint(problem: str, domain: str) -> str | None:
    """The answer ("yes" / "no") that the hint planted at the end of `problem` states (teacher.shortcut_rate),
    None when it has none: a per-problem handle on how far a student follows the cue."""
    d = DOMAINS.get(domain)
    return next((answer for answer, cue in zip(("yes", "no"), d.cues) if problem.endswith(cue)), None) if d else None


def without_hint(problem: str, domain: str) -> str:
    """`problem` as the teacher wrote it before planting its hint: the no-hint oracle's view of the same
    problem (Colored MNIST's grayscale digit)."""
    hint = stated_hint(problem, domain)
    if hint is None:
        return problem
    return problem.removesuffix(" " + DOMAINS[domain].cues[hint == "no"])

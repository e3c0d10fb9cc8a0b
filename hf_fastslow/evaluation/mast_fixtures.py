"""Hand-written MAST fixture traces: one trace per failure mode with that failure planted, plus clean traces.

Short two- or three-agent conversations (a few hundred tokens each) written for the package. `labels` are the gold
answer per code, written by hand for the whole trace (a planted trace that also shows another mode, e.g. a
task-spec violation its verifier missed, is labelled with both: see `_ALSO`); `task_completed` is gold too.
`fixture_traces()` returns fresh `Trace`s.
Caveat for readers of the benchmark: the deterministic heuristics (mast_heuristics) were written by the same author
as these traces, so their scores here are an upper bound; the agent-run traces are their out-of-sample check.
"""

from __future__ import annotations

from .mast_taxonomy import MAST_CODES
from .mast_traces import Trace, Turn

__all__ = ["FIXTURE_SOURCE", "fixture_traces"]

FIXTURE_SOURCE = "hf_fastslow-fixtures"

# (id, planted code or None, task_completed, task, turns, max_turns). Modes a planted trace shows besides its planted
# one (gold is per trace, not per plant) are listed in _ALSO.
_FIXTURES = [
    ("fm-1.1", "1.1", False,
     "Write a haiku about autumn: exactly three lines, no rhyme, and do not use the word 'leaf'.",
     [("planner", "Coder, please write the haiku. Three lines, no rhyme, and the word 'leaf' is forbidden."),
      ("coder", "Here it is:\nRed leaf drifting down\nthe cold wind is calling round\nsummer's gone to ground"),
      ("verifier", "I counted the lines: there are three. Approved."),
      ("planner", "FINAL ANSWER: Red leaf drifting down / the cold wind is calling round / summer's gone to ground")],
     None),
    ("fm-1.2", "1.2", True, "Compute 17 * 23. The solver computes; the reviewer only checks the solver's result.",
     [("solver", "I will start now."),
      ("reviewer", "No need to wait for you. 17 * 23 = 391, I worked it out myself and I am announcing it."),
      ("reviewer", "As the reviewer I also approve my own result: 17 * 20 = 340, 17 * 3 = 51, 340 + 51 = 391."),
      ("solver", "FINAL ANSWER: 391")], None),
    ("fm-1.3", "1.3", True, "Find the largest number in the list [4, 19, 7, 11].",
     [("planner", "Coder, find the maximum of [4, 19, 7, 11]."),
      ("coder", "I will scan the list: 4, then 19, then 7, then 11. The largest so far is 19."),
      ("coder", "I will scan the list: 4, then 19, then 7, then 11. The largest so far is 19."),
      ("coder", "I will scan the list: 4, then 19, then 7, then 11. The largest so far is 19."),
      ("verifier", "Checked: 19 is larger than 4, 7 and 11."),
      ("planner", "FINAL ANSWER: 19")], None),
    ("fm-1.4", "1.4", False, "Convert 5 kilometres to metres; the user asked for the answer in centimetres instead.",
     [("user", "Correction: please give the answer in centimetres, not metres."),
      ("planner", "Noted, centimetres. Coder, convert 5 km."),
      ("coder", "5 km = 5,000 m = 500,000 cm."),
      ("planner", "Let me restate the task as I remember it: convert 5 km to metres."),
      ("verifier", "Checked 5 km = 5,000 m: 5 * 1,000 = 5,000. Correct."),
      ("planner", "FINAL ANSWER: 5,000 metres")], None),
    ("fm-1.5", "1.5", True, "Say whether 29 is prime.",
     [("solver", "29 is not divisible by 2, 3 or 5, and 6 * 6 > 29, so 29 is prime."),
      ("verifier", "Verified: 29 has no divisor between 2 and 5. Prime."),
      ("solver", "Shall we also discuss 31?"),
      ("verifier", "Sure. 31 is prime too. Shall we look at 37?"),
      ("solver", "37 is prime. What about 41?"),
      ("verifier", "41 is prime. And 43?"),
      ("solver", "43 is prime. Let us continue with 47."),
      ("runtime", "Maximum number of turns (8) reached; the conversation was stopped.")], 8),
    ("fm-2.1", "2.1", True, "Sum the numbers 12, 30 and 8.",
     [("planner", "Coder, add 12, 30 and 8."),
      ("coder", "12 + 30 = 42. Next I add 8."),
      ("planner", "Hello everyone! Let's start over from the beginning. What is our task today?"),
      ("coder", "We need to sum 12, 30 and 8. 12 + 30 + 8 = 50."),
      ("verifier", "Checked: 12 + 30 = 42, 42 + 8 = 50."),
      ("planner", "FINAL ANSWER: 50")], None),
    ("fm-2.2", "2.2", False, "Book a table for the team dinner.",
     [("planner", "Booker, reserve a table for the team dinner."),
      ("booker", "The task does not say the date, the time, the restaurant or how many people. I will pick "
                 "Friday at 8 pm at a random pizzeria for 4 people and book it without asking."),
      ("booker", "Booked: Friday 8 pm, Luigi's, 4 people."),
      ("verifier", "Checked the confirmation e-mail: Luigi's, Friday 8 pm, 4 people. It matches the booking."),
      ("planner", "FINAL ANSWER: table booked at Luigi's, Friday 8 pm, 4 people.")], None),
    ("fm-2.3", "2.3", False, "Write a Python function that reverses a string.",
     [("planner", "Coder, write a Python function that reverses a string."),
      ("coder", "Before that, I think we should discuss which Python web framework is best for large sites."),
      ("planner", "Good point. Django has batteries included, Flask is lighter."),
      ("coder", "FastAPI is also popular for APIs because of its type hints."),
      ("planner", "Agreed, FastAPI it is. FINAL ANSWER: use FastAPI.")], None),
    ("fm-2.4", "2.4", False, "Fetch the price of product 42 and report it in euros.",
     [("fetcher", "I called the price service. It returned: 'price 30 USD; warning: the EUR rate endpoint is "
                  "down'."),
      ("fetcher", "Reporter, the price is 30."),
      ("reporter", "Thanks. Reporting 30 euros."),
      ("reporter", "FINAL ANSWER: product 42 costs 30 EUR.")], None),
    ("fm-2.5", "2.5", False, "Compute the area of a circle with radius 3 (use pi = 3.14).",
     [("solver", "Area = 2 * 3.14 * 3 = 18.84."),
      ("checker", "That is the circumference formula. The area is pi * r^2 = 3.14 * 9 = 28.26."),
      ("solver", "I keep my result: the area is 18.84."),
      ("solver", "FINAL ANSWER: 18.84")], None),
    ("fm-2.6", "2.6", False, "Sort the list [3, 1, 2] in descending order.",
     [("planner", "Coder, sort [3, 1, 2] in descending order."),
      ("coder", "Reasoning: descending order means largest first, so I will output 3, 2, 1."),
      ("coder", "Action: output [1, 2, 3]."),
      ("verifier", "The output is a sorted list, checked."),
      ("planner", "FINAL ANSWER: [1, 2, 3]")], None),
    ("fm-3.1", "3.1", False, "Translate the three sentences 'Good morning', 'Thank you' and 'Goodbye' into French.",
     [("planner", "Translator, translate the three sentences into French."),
      ("translator", "1. Good morning -> Bonjour."),
      ("planner", "Great, that is enough. We are done here, ending the conversation.")], None),
    ("fm-3.2", "3.2", True, "Compute 125 / 5 and report the result.",
     [("planner", "Solver, compute 125 / 5."),
      ("solver", "125 / 5 = 25."),
      ("planner", "FINAL ANSWER: 25")], None),
    ("fm-3.3", "3.3", False, "Compute 14 + 29.",
     [("solver", "14 + 29 = 33."),
      ("verifier", "Verifying: 14 + 29. 10 + 20 = 30 and 4 + 9 = 3, so 33. The result is correct, approved."),
      ("solver", "FINAL ANSWER: 33")], None),
    # ----- clean traces -----
    ("clean-01", None, True, "Compute 17 * 23.",
     [("planner", "Solver, compute 17 * 23."), ("solver", "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."),
      ("verifier", "Checked with a different split: 23 * 17 = 23 * 10 + 23 * 7 = 230 + 161 = 391. Correct."),
      ("planner", "FINAL ANSWER: 391")], None),
    ("clean-02", None, True, "Write a Python function that reverses a string.",
     [("planner", "Coder, write a function that reverses a string."),
      ("coder", "def reverse(s):\n    return s[::-1]"),
      ("tester", "Ran tests: reverse('abc') == 'cba', reverse('') == '', reverse('a') == 'a'. All pass."),
      ("planner", "FINAL ANSWER: def reverse(s): return s[::-1]")], None),
    ("clean-03", None, True, "Say whether 29 is prime.",
     [("solver", "29 is not divisible by 2, 3 or 5, and 6 * 6 > 29, so 29 is prime."),
      ("verifier", "Verified: no divisor from 2 to 5. 29 is prime."), ("solver", "FINAL ANSWER: yes, 29 is prime")],
     8),
    ("clean-04", None, True, "Book a table for four at Luigi's on Friday at 8 pm.",
     [("planner", "Booker, the user wants Luigi's, Friday 8 pm, 4 people."),
      ("booker", "Called Luigi's: table for 4 confirmed for Friday 8 pm, booking reference L-118."),
      ("verifier", "Checked the confirmation e-mail: Luigi's, Friday, 20:00, 4 guests, reference L-118. Matches."),
      ("planner", "FINAL ANSWER: booked, reference L-118")], None),
    ("clean-05", None, True, "Book a table for the team dinner.",
     [("planner", "Booker, reserve a table for the team dinner."),
      ("booker", "Before booking: which day, what time and how many people? Any preferred restaurant?"),
      ("planner", "Thursday at 7 pm, 6 people, any Italian place."),
      ("booker", "Booked Trattoria Roma for 6 on Thursday at 7 pm, reference R-22."),
      ("verifier", "Checked the confirmation: Trattoria Roma, Thursday 19:00, 6 guests. Correct."),
      ("planner", "FINAL ANSWER: Trattoria Roma, Thursday 7 pm, reference R-22")], None),
    ("clean-06", None, True, "Compute the area of a circle with radius 3 (use pi = 3.14).",
     [("solver", "Area = 2 * 3.14 * 3 = 18.84."),
      ("checker", "That is the circumference. The area is pi * r^2 = 3.14 * 9 = 28.26."),
      ("solver", "You are right, I used the wrong formula. Area = 3.14 * 9 = 28.26."),
      ("checker", "Verified: 3 * 3 = 9 and 9 * 3.14 = 28.26."), ("solver", "FINAL ANSWER: 28.26")], None),
    ("clean-07", None, True, "Sort the list [3, 1, 2] in descending order.",
     [("planner", "Coder, sort [3, 1, 2] in descending order."),
      ("coder", "Descending means largest first: [3, 2, 1]."),
      ("verifier", "Checked each pair: 3 >= 2 >= 1, and the list holds the same three numbers. Correct."),
      ("planner", "FINAL ANSWER: [3, 2, 1]")], None),
    ("clean-08", None, True, "Translate 'Good morning', 'Thank you' and 'Goodbye' into French.",
     [("planner", "Translator, translate the three sentences."),
      ("translator", "Good morning -> Bonjour. Thank you -> Merci. Goodbye -> Au revoir."),
      ("reviewer", "Checked all three against the dictionary: Bonjour, Merci, Au revoir are correct."),
      ("planner", "FINAL ANSWER: Bonjour / Merci / Au revoir")], None),
    ("clean-09", None, True, "Fetch the price of product 42 and report it in euros.",
     [("fetcher", "The price service returned 30 USD. The EUR rate endpoint is down, so I used yesterday's "
                  "published rate of 0.92 EUR per USD and I am telling you that it is yesterday's rate."),
      ("reporter", "Thanks for the warning. 30 * 0.92 = 27.60 EUR, at yesterday's rate."),
      ("verifier", "Checked the multiplication: 30 * 0.92 = 27.6. Correct, and the caveat is stated."),
      ("reporter", "FINAL ANSWER: about 27.60 EUR (at yesterday's rate)")], None),
    ("clean-10", None, True, "Find the largest number in the list [4, 19, 7, 11].",
     [("planner", "Coder, find the maximum."), ("coder", "Scanning: 4, 19, 7, 11. The maximum is 19."),
      ("verifier", "Checked: 19 > 11 > 7 > 4. Correct."), ("planner", "FINAL ANSWER: 19")], None),
]


# e.g. the haiku's verifier only counted lines (incomplete verification); the sort's verifier approved a wrong list.
_ALSO = {"fm-1.1": ("3.2",), "fm-1.4": ("3.2",), "fm-2.3": ("3.2",), "fm-2.4": ("3.2",), "fm-2.6": ("3.3",),
         "fm-3.1": ("3.2",)}


def fixture_traces(*, include_clean: bool = True) -> list[Trace]:
    """Fresh copies of the fixture traces (14 planted + 10 clean), each labelled on all 14 codes."""
    out = []
    for trace_id, planted, done, task, turns, max_turns in _FIXTURES:
        if planted is None and not include_clean:
            continue
        positives = {planted, *_ALSO.get(trace_id, ())}
        labels = {c: c in positives for c in MAST_CODES}
        out.append(Trace(trace_id, task, [Turn(s, t) for s, t in turns], source=FIXTURE_SOURCE, labels=labels,
                         task_completed=done, max_turns=max_turns, meta={"planted": planted}))
    return out

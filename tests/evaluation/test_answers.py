"""The one numeric answer extractor: final-answer forms first, the last number otherwise, normalized."""

from hf_fastslow.evaluation.answers import answers_match, extract_answer, normalize_number


def test_final_answer_forms_win_over_later_numbers():
    assert extract_answer("so 3+4 = 7\n#### 1,234") == "1234"
    assert extract_answer("The answer is $18. Check: 9 * 2 = 18, 5 steps") == "18"
    assert extract_answer("we get \\boxed{42.0} after 3 steps") == "42"
    assert extract_answer("first 3 then 5") == "5"
    assert extract_answer("-7 degrees") == "-7"
    assert extract_answer("no digits") is None and extract_answer(None) is None


def test_normalize_number():
    assert normalize_number("1,234.") == "1234" and normalize_number("0.50") == "0.5" and normalize_number(" x ") == "x"


def test_answers_match_compares_extracted_numbers():
    assert answers_match("The code for record K7Q3-A is 48213.", "48213")
    assert answers_match("#### 12", 12)
    assert not answers_match("The code is 48214", "48213")
    assert not answers_match("I do not know", "48213")
    assert not answers_match("", "")  # no answer on either side is never a match

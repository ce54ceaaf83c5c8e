"""Figure and view builders shared by the pages: pure functions of the API's JSON."""

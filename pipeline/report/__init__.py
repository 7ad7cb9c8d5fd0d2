"""The report: figures (:mod:`.plots`), pages (:mod:`.render`), tables (:mod:`.sections`) and the keyed report stage (:mod:`.build`)."""

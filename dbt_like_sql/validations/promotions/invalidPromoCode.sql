-- promoCode null, or not 4 to 16 upper-case letters and digits
"promoCode" IS NULL OR NOT regexp_full_match(CAST("promoCode" AS VARCHAR), '^[A-Z0-9]{4,16}$')

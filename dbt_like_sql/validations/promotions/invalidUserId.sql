-- userId null or blank
"userId" IS NULL OR trim(CAST("userId" AS VARCHAR)) = ''
